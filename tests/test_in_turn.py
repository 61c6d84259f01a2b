"""int8 slots encoded one after another on a CPU (rmsjax/_src/in_turn.py): the same
values as the plain step, bit for bit, and no copy of the old codes at the step's peak."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from rmsjax._src import engine, fusion, in_turn

CHAINS = {  # every rule that keeps int8 state, alone and with int8 momentum
    "rmsprop": lambda: rj.rmsprop(1e-3, storage="int8"),
    "rmsprop momentum": lambda: rj.rmsprop(1e-3, momentum=0.9, storage="int8"),
    "rmsprop nesterov eps 0": lambda: rj.rmsprop(
        1e-3, eps=0.0, momentum=0.9, nesterov=True, storage="int8"
    ),
    "rmsprop eps outside, bias correction": lambda: rj.chain(
        rj.scale_by_rms(eps=1e-6, eps_in_sqrt=False, bias_correction=True, storage="int8"),
        rj.trace(0.9, storage="int8"),
        rj.scale(-1e-3),
    ),
    "centered": lambda: rj.rmsprop(1e-3, centered=True, storage="int8"),
    "centered momentum": lambda: rj.rmsprop(1e-3, centered=True, momentum=0.9, storage="int8"),
    "adagrad": lambda: rj.adagrad(1e-2, storage="int8"),
    "adagrad momentum": lambda: rj.chain(
        rj.scale_by_rss(storage="int8"), rj.trace(0.9, storage="int8"), rj.scale(-1e-2)
    ),
}

# Leaves that fill whole blocks (encoded in turn), one that does not (the plain step),
# and a small one that keeps float32 state.
PARAMS = {
    "w": jnp.linspace(-1.0, 1.0, 64 * 512, dtype=jnp.float32).reshape(64, 512),
    "table": jnp.linspace(0.5, -0.5, 1024 * 32, dtype=jnp.float32).reshape(1024, 32),
    "odd": jnp.full((300, 70), 0.25, jnp.float32),
    "b": jnp.zeros((8,), jnp.float32),
}
SCALES = (1.0, 1e-3, 1e3, 1e-20, 1e20, 0.0)  # the last: a zero gradient


def gradients(seed: int):
    rng = np.random.default_rng(seed)
    for scale in SCALES:
        yield {
            k: jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32) for k, v in PARAMS.items()
        }


@pytest.fixture
def small_leaves_in_turn(monkeypatch):
    """Encode leaves of any size in turn, so that small leaves test the mechanism."""
    monkeypatch.setattr(in_turn, "MIN_SIZE", 0)


def trajectory(tx, apply: bool, monkeypatch, limit: int):
    monkeypatch.setattr(in_turn, "MAX_LEAVES", limit)
    if apply:
        step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    else:
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    params, state, seen = PARAMS, tx.init(PARAMS), []
    for grads in gradients(0):
        out, state = step(params, state, grads)
        params = out if apply else jax.tree.map(lambda p, u: p + u, params, out)
        seen.append([np.asarray(x) for x in jax.tree.leaves((out, state))])
    return seen


CASES = [(name, True) for name in sorted(CHAINS)] + [
    ("rmsprop momentum", False),  # update() hands back updates, not parameters
    ("centered momentum", False),
]


@pytest.mark.usefixtures("small_leaves_in_turn")
@pytest.mark.parametrize("name,apply", CASES)
def test_slots_encoded_in_turn_are_the_plain_steps_bit_for_bit(name, apply, monkeypatch):
    tx = CHAINS[name]()
    in_turn_steps = trajectory(tx, apply, monkeypatch, limit=64)
    plain_steps = trajectory(tx, apply, monkeypatch, limit=0)
    for step, (got, want) in enumerate(zip(in_turn_steps, plain_steps)):
        for a, b in zip(got, want):
            assert np.array_equal(a, b, equal_nan=True), f"step {step} differs"


# Stacked blocks (rj.grouped): three of whole int8 blocks, two padded ones, and small
# leaves that keep float32 state.
GROUPED_PARAMS = {
    **{f"w{i}": jnp.linspace(-1.0, 1.0 + i, 32 * 256, dtype=jnp.float32) for i in range(3)},
    **{f"odd{i}": jnp.full((67, 131), 0.25 * (i + 1), jnp.float32) for i in range(2)},
    **{f"b{i}": jnp.zeros((8,), jnp.float32) for i in range(2)},
}


def grouped_trajectory(tx, apply: bool, grouped: bool):
    """Updates or parameters, and the per-leaf state (ungrouped), step by step."""
    if apply:
        step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    else:
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    rng = np.random.default_rng(1)
    params, state, seen = GROUPED_PARAMS, tx.init(GROUPED_PARAMS), []
    for scale in SCALES:
        grads = {
            k: jnp.asarray(rng.normal(size=v.shape) * scale, jnp.float32)
            for k, v in GROUPED_PARAMS.items()
        }
        out, state = step(params, state, grads)
        params = out if apply else jax.tree.map(lambda p, u: p + u, params, out)
        per_leaf = rj.ungroup_state(tx, state, params) if grouped else state
        seen.append([np.asarray(x) for x in jax.tree.leaves((out, per_leaf))])
    return seen


@pytest.mark.parametrize("name,apply", CASES)
def test_stacked_blocks_encoded_in_turn_step_as_the_leaves_do_bit_for_bit(name, apply):
    # Encoded in turn, a padded block's slots are computed in the codes' block layout as
    # a padded leaf's are: before, centered RMSprop's moments of padded stacked leaves
    # differed from the per-leaf step's by a code here and there (at zero gradients).
    tx = rj.grouped(CHAINS[name](), block_size=3)
    state = tx.init(GROUPED_PARAMS)
    stacked = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int8 and x.ndim == 3]
    assert stacked and {x.shape[0] for x in stacked} >= {2, 3}  # blocks of 3 and of 2
    blocks = grouped_trajectory(tx, apply, grouped=True)
    leaves = grouped_trajectory(CHAINS[name](), apply, grouped=False)
    for step, (got, want) in enumerate(zip(blocks, leaves)):
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b, equal_nan=True), f"step {step} differs"


def test_stacked_blocks_encoded_in_turn_keep_no_copy_of_their_old_codes(monkeypatch):
    # Left to XLA, each block's old codes were copied and the copies of all blocks were
    # alive at once, however few blocks ran at once (engine.IN_FLIGHT). On 256 leaves of
    # 4096 in blocks of 16, one block in flight: 0.77 bytes per parameter of temporaries
    # in turn against 1.77 (measured on this jaxlib, 0.10.2).
    monkeypatch.setattr(engine, "IN_FLIGHT", 32)
    tx = rj.grouped(rj.rmsprop(1e-3, momentum=0.9, storage="int8"), block_size=16)
    params = {f"w{i}": jnp.ones((16, 256)) for i in range(256)}
    temporaries, total = peak(tx, params)
    assert temporaries < 0.85 and total < 11, (temporaries, total)
    monkeypatch.setattr(in_turn, "applies_to_block", lambda *args: False)
    plain_temporaries, _ = peak(tx, params)
    assert plain_temporaries > temporaries + 0.9, plain_temporaries  # two slots' copies


def peak(tx, params) -> tuple[float, float]:
    """(temporaries, peak) in bytes per parameter of the compiled, donated step."""
    step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p), donate_argnums=(0, 1))
    stats = step.lower(params, tx.init(params), params).compile().memory_analysis()
    count = sum(x.size for x in jax.tree.leaves(params))
    temporaries = stats.temp_size_in_bytes / count
    return temporaries, temporaries + stats.argument_size_in_bytes / count


# Measured on this jaxlib (0.10.2): 0.52-0.53 bytes per parameter of temporaries (the
# block scales' half-byte exponents of one slot at a time, and the old scales), against
# 1.02 (one int8 slot) and 2.03-3.05 (two or three) before the slots were encoded in turn.
@pytest.mark.usefixtures("small_leaves_in_turn")
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_step_keeps_no_copy_of_its_old_codes(name, monkeypatch):
    tx = CHAINS[name]()
    params = {"w": jnp.ones((256, 1024))}
    temporaries, total = peak(tx, params)
    slots = len([x for x in jax.tree.leaves(tx.init(params)) if x.dtype == jnp.int8])
    assert temporaries < 0.6, f"{temporaries:.2f} bytes per parameter of temporaries"
    assert total < 8 + 1.02 * slots + 0.6
    monkeypatch.setattr(in_turn, "MAX_LEAVES", 0)
    plain_temporaries, _ = peak(tx, params)
    assert plain_temporaries > temporaries + 0.4  # the copies this avoids


def test_rmsprop_with_int8_momentum_peaks_under_11_bytes_per_parameter(monkeypatch):
    # benchmarks/memory.py's target, on one leaf of the smallest size encoded in turn by
    # default, and on as many small leaves as are encoded in turn when they may be;
    # float32 state peaks at 16.
    tx = rj.rmsprop(1e-3, momentum=0.9, storage="int8")
    _, one_leaf = peak(tx, {"w": jnp.ones((in_turn.MIN_SIZE // 1024, 1024))})
    monkeypatch.setattr(in_turn, "MIN_SIZE", 0)
    leaves = {f"w{i}": jnp.ones((64, 256)) for i in range(in_turn.MAX_LEAVES)}
    _, many = peak(tx, leaves)
    assert one_leaf < 11 and many < 11, (one_leaf, many)


def test_a_leaf_padded_to_whole_blocks_computes_its_slots_in_the_block_layout(monkeypatch):
    # docs/memory.md, "Where these figures do not hold": computed in the leaf's layout,
    # each new slot of a leaf whose size is no multiple of 256 was padded mid-step into
    # a float32 temporary: 14.02 and 19.05 bytes per parameter for RMSprop without and
    # with int8 momentum on 1023 x 1023 (float32 state: 12 and 16). In the block layout
    # only the padded gradient is left: 14.04 and 16.07 on this jaxlib, and on ordinary
    # gradients the values are the plain step's, bit for bit (docs/memory.md says where
    # a last-bit difference in a moment can round to the neighbouring code).
    params = {"w": jnp.ones((1023, 1023))}
    tx = rj.rmsprop(1e-3, momentum=0.9, storage="int8")
    temporaries, total = peak(tx, params)
    assert temporaries < 6.1 and total < 16.1, (temporaries, total)
    monkeypatch.setattr(in_turn, "padded", lambda *args: False)
    old_temporaries, _ = peak(tx, params)
    assert old_temporaries > temporaries + 2.9  # a padded float32 slot less
    monkeypatch.undo()
    rng = np.random.default_rng(2)
    leaves = {"w": jnp.asarray(rng.normal(size=(67, 131)), jnp.float32)}
    tx = rj.rmsprop(1e-2, momentum=0.9, centered=True, storage="int8")

    def trajectory():
        state, p = tx.init(leaves), leaves
        step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
        for t in range(4):
            p, state = step(p, state, jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)), p))
        return jax.tree.leaves((p, state))

    ours = trajectory()
    monkeypatch.setattr(in_turn, "padded", lambda *args: False)
    for a, b in zip(ours, trajectory(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_only_a_cpu_step_with_few_large_int8_leaves_is_encoded_in_turn():
    cpu = jax.default_backend() == "cpu"
    large = (rj.quantize(jnp.ones((in_turn.MIN_SIZE,)), signed=False),)
    small = (rj.quantize(jnp.ones((in_turn.MIN_SIZE // 2,)), signed=False),)
    assert in_turn.worth_it([large] * in_turn.MAX_LEAVES) == cpu
    assert not in_turn.worth_it([large] * (in_turn.MAX_LEAVES + 1))
    assert in_turn.worth_it([large] + [small] * 100) == cpu  # only large leaves count
    assert not in_turn.worth_it([small] * 10)
    assert not in_turn.worth_it([(jnp.ones(4096),)])  # float32 state: nothing to encode
    rule = fusion.leaf_rule_of(rj.rmsprop(1e-3, storage="int8"))
    assert in_turn.applies(rule, jnp.ones(in_turn.MIN_SIZE), large)
    assert not in_turn.applies(rule, jnp.ones(in_turn.MIN_SIZE // 2), small)


def test_small_leaves_keep_the_plain_step_by_default():
    # Below MIN_SIZE the compiled step would hold more memory for the ordering than the
    # copies it saves: the step keeps XLA's copies of the old codes.
    tx = rj.rmsprop(1e-3, momentum=0.9, storage="int8")
    temporaries, _ = peak(tx, {f"w{i}": jnp.ones((64, 256)) for i in range(4)})
    assert temporaries > 1.0, temporaries  # copies of old codes (in turn: about 0.52)
