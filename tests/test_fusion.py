"""Fusion and the grouped layout change speed only: the same numbers, bit for bit, and
one trace per step function.

* every alias, fused (one walk of the tree, the parameter update in the same loop) equals
  the same parts run one after another, each with its own walk, then apply_updates;
* ``grouped(alias)`` (state in blocks of stacked leaves) equals the per-leaf alias, its
  state converts back to the per-leaf state exactly, and float32 equals optax;
* jitted steps trace once.
"""

from __future__ import annotations

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from rmsjax._src import base, fusion
from tests import registry, trees

STEPS = 60
CHECK_EVERY = 10


def repeated_params(dtype=jnp.float32) -> dict:
    """Same-shaped leaves (so that blocks hold several), odd sizes, a scalar, a None."""
    return {
        "blocks": [
            {"w": jnp.linspace(-1.0, 1.0, 21, dtype=dtype).reshape(3, 7) * (i + 1), "b": None}
            for i in range(5)
        ],
        "bias": [jnp.full((7,), 0.1 * i, dtype) for i in range(3)],
        "scale": jnp.asarray(0.5, dtype),
        "big": jnp.linspace(0.0, 1.0, 4099, dtype=dtype),
    }


# (name, the alias, its parts in order): the parts are what the alias is a chain of.
ALIASES = [
    (case.name, functools.partial(case.make, rj), functools.partial(case.parts, rj))
    for case in registry.cases("fusion").values()
]
ALIAS_IDS = [name for name, _, _ in ALIASES]
DTYPES = [jnp.float32, jnp.bfloat16]


def assert_trees_equal(actual, expected) -> None:
    chex.assert_trees_all_equal_structs(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))


def unfused_step(parts):
    """Each part's own update (its own walk of the tree), then apply_updates."""

    def step(params, states, grads):
        updates, new_states = grads, []
        for part, state in zip(parts, states):
            updates, state = part.update(updates, state, params)
            new_states.append(state)
        return rj.apply_updates(params, updates), tuple(new_states)

    return step


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,alias,parts", ALIASES, ids=ALIAS_IDS)
def test_fused_alias_equals_its_parts_run_one_by_one(name, alias, parts, dtype):
    tx, pieces = alias(), parts()
    params = repeated_params(dtype)
    grads = trees.gradient_sequence(params, STEPS, seed=3)
    fused = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    fused_then_apply = jax.jit(
        lambda p, s, g: (lambda u, s: (rj.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    reference = jax.jit(unfused_step(pieces))
    p1 = p2 = p3 = params
    s1 = s2 = tx.init(params)
    s3 = tuple(piece.init(params) for piece in pieces)
    for step, g in enumerate(grads, 1):
        p1, s1 = fused(p1, s1, g)
        p2, s2 = fused_then_apply(p2, s2, g)
        p3, s3 = reference(p3, s3, g)
        if step % CHECK_EVERY == 0:
            assert_trees_equal(p1, p3)
            assert_trees_equal(p2, p3)
            assert_trees_equal(s1, s3)  # the same state layout as the unfused chain
            assert_trees_equal(s2, s3)
    chex.assert_tree_all_finite(p1)


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [1, 2, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,alias,parts", ALIASES, ids=ALIAS_IDS)
def test_grouped_equals_per_leaf(name, alias, parts, dtype, block_size):
    del parts
    tx = alias()
    gtx = rj.grouped(alias(), block_size=block_size, max_stacked_size=1024)
    params = repeated_params(dtype)
    grads = trees.gradient_sequence(params, STEPS, seed=4)
    per_leaf = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    blocked = jax.jit(lambda p, s, g: rj.update_and_apply(gtx, g, s, p))
    per_leaf_updates = jax.jit(lambda p, s, g: tx.update(g, s, p))
    blocked_updates = jax.jit(lambda p, s, g: gtx.update(g, s, p))
    p1 = p2 = params
    s1, s2 = tx.init(params), gtx.init(params)
    assert isinstance(s2, rj.GroupedState)
    assert_trees_equal(rj.ungroup_state(gtx, s2, params), s1)
    for step, g in enumerate(grads, 1):
        if step % CHECK_EVERY == 0:  # the update itself, before applying it
            assert_trees_equal(blocked_updates(p2, s2, g)[0], per_leaf_updates(p1, s1, g)[0])
        p1, s1 = per_leaf(p1, s1, g)
        p2, s2 = blocked(p2, s2, g)
        if step % CHECK_EVERY == 0:
            assert_trees_equal(p2, p1)
            assert_trees_equal(rj.ungroup_state(gtx, s2, params), s1)
            assert_trees_equal(rj.group_state(gtx, s1, params), s2)


STORAGE_CHAINS = {
    "rmsprop": lambda storage: rj.rmsprop(1e-3, storage=storage),
    "rmsprop_momentum": lambda storage: rj.rmsprop(1e-3, momentum=0.9, storage=storage),
    "rmsprop_centered": lambda storage: rj.rmsprop(
        1e-3, centered=True, momentum=0.9, storage=storage
    ),
    "adagrad": lambda storage: rj.adagrad(1e-2, storage=storage),
}


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
@pytest.mark.parametrize("chain", sorted(STORAGE_CHAINS))
def test_grouped_keeps_low_precision_state_per_leaf(chain, storage):
    # Stacked leaves of 4096 elements and more, which int8 quantizes: each row of a
    # block holds that leaf's own codes and scales, so the numbers, the per-leaf state
    # and the conversions are those of the ungrouped optimizer, bit for bit.
    make = STORAGE_CHAINS[chain]
    tx = make(storage)
    gtx = rj.grouped(make(storage), block_size=2)
    params = {
        "square": [jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64) * (i + 1) for i in range(3)],
        "rows": [jnp.linspace(-2.0, 2.0, 4096).reshape(16, 256) * (i + 1) for i in range(2)],
        "small": [jnp.linspace(0.0, 1.0, 30) for _ in range(2)],
    }
    s1, s2 = tx.init(params), gtx.init(params)
    if storage == "int8":
        block = s2.inner
        quantized = lambda x: isinstance(x, rj.QuantizedArray)  # noqa: E731
        codes = [q.codes for q in jax.tree.leaves(block, is_leaf=quantized) if quantized(q)]
        assert any(jnp.ndim(c) == 4 for c in codes)  # stacked int8 slots
    assert_trees_equal(rj.ungroup_state(gtx, s2, params), s1)
    per_leaf = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    blocked = jax.jit(lambda p, s, g: rj.update_and_apply(gtx, g, s, p))
    p1 = p2 = params
    for step, g in enumerate(trees.gradient_sequence(params, 6, seed=5), 1):
        if step == 3:  # op by op, and the update alone
            assert_trees_equal(gtx.update(g, s2, p2)[0], tx.update(g, s1, p1)[0])
        p1, s1 = per_leaf(p1, s1, g)
        p2, s2 = blocked(p2, s2, g)
        assert_trees_equal(p2, p1)
    assert_trees_equal(rj.ungroup_state(gtx, s2, params), s1)
    assert_trees_equal(rj.group_state(gtx, s1, params), s2)
    other = {**params, "square": [x.reshape(32, 128) for x in params["square"]]}
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.grouped\.update: the update at \['square'\]\[0\] has shape \(32, 128\) "
        r"but the parameter the state was made for has \(64, 64\)",
    ):
        gtx.update(other, s2, other)
    # a state that does not say what it was made for is checked block by block
    with pytest.raises(ValueError, match=r"a block of the state has shape \(2, 64, 64\)"):
        gtx.update(other, s2._replace(structure=None), other)


def test_grouped_block_layout():
    params = repeated_params()
    blocks = rj.leaf_blocks(params, block_size=2, max_stacked_size=1024)
    leaves = jax.tree.leaves(params)
    # In tree order: 3 vectors in blocks of 2 and 1; the big leaf alone; 5 matrices in
    # blocks of 2, 2 and 1; the scalar.
    assert [len(b) for b in blocks] == [2, 1, 1, 2, 2, 1, 1]
    assert sorted(i for b in blocks for i in b) == list(range(len(leaves)))
    for block in blocks:
        assert len({(leaves[i].shape, leaves[i].dtype) for i in block}) == 1
    gtx = rj.grouped(rj.rmsprop(0.1, momentum=0.9), block_size=2, max_stacked_size=1024)
    state = gtx.init(params)
    nu = state.inner[0].nu
    # A block of one leaf holds its state as is; larger blocks stack along axis 0.
    expected = [((len(b),) if len(b) > 1 else ()) + leaves[b[0]].shape for b in blocks]
    assert [b.shape for b in nu] == expected
    assert state.inner[0].count.shape == ()


def test_grouped_stacks_leaves_of_up_to_32768_elements_by_default():
    params = {
        "mid": [jnp.ones((128, 256)) * i for i in range(3)],  # 32768 elements: stacked
        "big": [jnp.ones(32769) * i for i in range(2)],  # one more: alone
    }
    assert rj.leaf_blocks(params) == ((0,), (1,), (2, 3, 4))  # "big" sorts first
    # A state saved before the default changed (4096) keeps its layout with that limit.
    old_layout = rj.grouped(rj.rmsprop(0.1), max_stacked_size=4096)
    state = old_layout.init(params)
    assert [x.shape for x in state.inner[0].nu] == [(32769,)] * 2 + [(128, 256)] * 3
    grads = jax.tree.map(lambda x: x + 1.0, params)
    new_params, _ = rj.update_and_apply(old_layout, grads, state, params)
    want, _ = rj.update_and_apply(rj.rmsprop(0.1), grads, rj.rmsprop(0.1).init(params), params)
    assert_trees_equal(new_params, want)


@pytest.mark.slow
def test_grouped_default_block_size_follows_the_group_size():
    # 300 vectors of one shape: more than 256 leaves, so blocks of 16 (18 full ones and
    # one of 12); 5 leaves of another shape: one block; the big leaf alone.
    params = {
        "many": [jnp.full((3,), i, jnp.float32) for i in range(300)],
        "few": [jnp.ones((2, 2)) * i for i in range(5)],
        "big": jnp.ones(5000),
    }
    assert [rj.auto_block_size(n) for n in (1, 256, 257, 1024, 1025, 10**6)] == [
        8,
        8,
        16,
        16,
        32,
        32,
    ]
    blocks = rj.leaf_blocks(params)
    assert [len(b) for b in blocks] == [1] + [5] + [16] * 18 + [12]
    tx, gtx = rj.rmsprop(0.01, momentum=0.9), rj.grouped(rj.rmsprop(0.01, momentum=0.9))
    state, gstate = tx.init(params), gtx.init(params)
    assert [b.shape for b in gstate.inner[0].nu] == [(5000,), (5, 2, 2)] + [(16, 3)] * 18 + [
        (12, 3)
    ]
    p1 = p2 = params
    for g in trees.gradient_sequence(params, 3, seed=8):
        p1, state = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))(p1, state, g)
        p2, gstate = jax.jit(lambda p, s, g: rj.update_and_apply(gtx, g, s, p))(p2, gstate, g)
    assert_trees_equal(p2, p1)
    assert_trees_equal(rj.ungroup_state(gtx, gstate, params), state)


def test_grouped_inside_a_chain_with_a_global_rule():
    params = repeated_params()
    grads = trees.gradient_sequence(params, 20, seed=5)
    tx = rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(0.01, momentum=0.9))
    gtx = rj.chain(
        rj.clip_by_global_norm(1.0), rj.grouped(rj.rmsprop(0.01, momentum=0.9), block_size=3)
    )
    step1 = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    step2 = jax.jit(lambda p, s, g: rj.update_and_apply(gtx, g, s, p))
    p1 = p2 = params
    s1, s2 = tx.init(params), gtx.init(params)
    for g in grads:
        p1, s1 = step1(p1, s1, g)
        p2, s2 = step2(p2, s2, g)
    assert_trees_equal(p2, p1)


# optax divides 0 by 0 where Adagrad starts at zero with eps=0; rmsjax stays finite.
OPTAX_PEERS = [
    name
    for name, case in registry.cases("fusion").items()
    if case.in_optax and name != "adagrad-zero-start"
]


@pytest.mark.parametrize("alias", OPTAX_PEERS)
def test_fused_and_grouped_equal_optax_in_float32(alias):
    optax = pytest.importorskip("optax")
    make = registry.cases("fusion")[alias].make
    params = repeated_params()
    grads = trees.gradient_sequence(params, STEPS, seed=6)
    otx, tx, gtx = make(optax), make(rj), rj.grouped(make(rj), block_size=2)

    @jax.jit
    def optax_step(p, s, g):
        updates, s = otx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    fused = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    blocked = jax.jit(lambda p, s, g: rj.update_and_apply(gtx, g, s, p))
    p0 = p1 = p2 = params
    s0, s1, s2 = otx.init(params), tx.init(params), gtx.init(params)
    for g in grads:
        p0, s0 = optax_step(p0, s0, g)
        p1, s1 = fused(p1, s1, g)
        p2, s2 = blocked(p2, s2, g)
    assert_trees_equal(p1, p0)
    assert_trees_equal(p2, p0)


@pytest.mark.parametrize("grouped", [False, True], ids=["per_leaf", "grouped"])
@pytest.mark.parametrize("name,alias,parts", ALIASES, ids=ALIAS_IDS)
def test_no_step_recompiles(name, alias, parts, grouped):
    del parts
    tx = rj.grouped(alias(), block_size=2) if grouped else alias()
    chex.clear_trace_counter()  # chex counts per function definition, across parameters

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, grads):
        return rj.update_and_apply(tx, grads, state, params)

    params = repeated_params()
    state = tx.init(params)
    for g in trees.gradient_sequence(params, 6, seed=7):
        params, state = step(params, state, g)
    chex.assert_tree_all_finite(params)


def test_grouped_needs_an_elementwise_chain():
    with pytest.raises(TypeError, match="elementwise"):
        rj.grouped(rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(0.1)))
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1 or None, got 0"):
        rj.grouped(rj.rmsprop(0.1), block_size=0)
    with pytest.raises(TypeError, match=r"max_stacked_size must be an integer >= 1, got 2.5"):
        rj.grouped(rj.rmsprop(0.1), max_stacked_size=2.5)


def test_grouped_state_mismatch_errors():
    gtx = rj.grouped(rj.adagrad(0.1))
    params = repeated_params()
    with pytest.raises(TypeError, match="GroupedState"):
        gtx.update(params, rj.adagrad(0.1).init(params), params)
    other = {"only": jnp.ones(3)}
    with pytest.raises(ValueError, match="blocks"):
        gtx.update(other, gtx.init(params), other)
    with pytest.raises(ValueError, match="shape"):
        bigger = {"only": jnp.ones(4)}
        gtx.update(bigger, gtx.init(other), bigger)


def _mixed_precision_params():
    # same-shaped leaves of two dtypes, interleaved: a gradient tree cast to one dtype
    # would make other blocks than the parameters do
    return {
        f"l{i:02d}": jnp.full((3, 4), 1.0 + i, jnp.float32 if i % 2 == 0 else jnp.bfloat16)
        for i in range(16)
    }


@pytest.mark.parametrize(
    "tx",
    [rj.rmsprop(0.1, momentum=0.9), rj.adagrad(0.1), rj.rmsprop(0.1, storage="int8")],
    ids=["rmsprop_momentum", "adagrad", "rmsprop_int8"],
)
@pytest.mark.parametrize("block_size", [None, 3])
def test_grouped_blocks_are_those_of_the_parameters_whatever_the_gradients_dtypes(tx, block_size):
    # blocks were made from each step's gradients: float32 gradients for bfloat16
    # parameters stacked them with the float32 parameters' leaves, and one leaf's state
    # went to another without an error
    params = _mixed_precision_params()
    gtx = rj.grouped(tx, block_size=block_size)
    rng = np.random.default_rng(3)

    def gradients(dtype=None):
        return {
            k: jnp.asarray(rng.standard_normal((3, 4)) * 10.0 ** (i % 7 - 3), dtype or p.dtype)
            for i, (k, p) in enumerate(params.items())
        }

    p1 = p2 = params
    s1, s2 = tx.init(params), gtx.init(params)
    for g in (gradients(), gradients(jnp.float32), gradients(jnp.float32)):
        u1, _ = jax.jit(tx.update)(g, s1, p1)
        u2, _ = jax.jit(gtx.update)(g, s2, p2)
        assert_trees_equal(u2, u1)
        p1, s1 = jax.jit(functools.partial(rj.update_and_apply, tx))(g, s1, p1)
        p2, s2 = jax.jit(functools.partial(rj.update_and_apply, gtx))(g, s2, p2)
        assert_trees_equal(p2, p1)
    assert_trees_equal(rj.ungroup_state(gtx, s2, params), s1)
    assert_trees_equal(rj.group_state(gtx, s1, params), s2)


def test_grouped_refuses_gradients_its_blocks_cannot_stack():
    params = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(5), "d": jnp.ones(5)}
    gtx = rj.grouped(rj.rmsprop(0.1))
    state = gtx.init(params)
    # b and c swapped shapes: the blocks made from them were the parameters' blocks, so
    # b's gradient went to c's state (params are optional for rmsprop)
    swapped = {"a": jnp.ones(3), "b": jnp.ones(5), "c": jnp.ones(3), "d": jnp.ones(5)}
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.grouped\.update: the update at \['b'\] has shape \(5,\) but the "
        r"parameter the state was made for has \(3,\)",
    ):
        gtx.update(swapped, state)
    # two gradient dtypes for leaves stacked in one block
    mixed = {**params, "b": jnp.ones(3, jnp.bfloat16)}
    with pytest.raises(
        TypeError,
        match=r"^rmsjax\.grouped\.update: the gradients of the leaves stacked in one block of "
        r"state must share a dtype; the update at \['a'\] is float32 and at \['b'\] bfloat16 "
        r"\(both parameters float32\)",
    ):
        gtx.update(mixed, state, params)
    # a state made with other settings is named as such
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.grouped\.update: the state holds 4 blocks, and grouped\(block_size=None, "
        r"max_stacked_size=32768\) makes 2 .* made with other settings",
    ):
        gtx.update(params, rj.grouped(rj.rmsprop(0.1), block_size=1).init(params))


@pytest.mark.parametrize(
    "wrong",
    [
        {"w": jnp.ones(4), "x": jnp.ones(3), "y": jnp.ones(3)},  # a block of one, other rank
        {"w": jnp.ones((2, 2)), "x": jnp.ones((3, 1)), "y": jnp.ones((3, 1))},  # stacked
        {"w": jnp.ones((2, 3)), "x": jnp.ones(3), "y": jnp.ones(3)},  # same rank
    ],
    ids=["rank_of_a_leaf_alone", "rank_of_stacked_leaves", "same_rank"],
)
def test_grouped_state_conversions_check_the_parameters_shapes(wrong):
    params = {"w": jnp.ones((2, 2)), "x": jnp.ones(3), "y": jnp.ones(3)}
    gtx = rj.grouped(rj.rmsprop(0.1))
    with pytest.raises(ValueError, match=r"^rmsjax\.ungroup_state: params at .* has shape"):
        rj.ungroup_state(gtx, gtx.init(params), wrong)
    with pytest.raises(ValueError, match=r"^rmsjax\.group_state: the state's nu for .* has shape"):
        rj.group_state(gtx, rj.rmsprop(0.1).init(params), wrong)
    # a state that keeps no shapes (pickled before it kept them) is checked block by block
    unchecked = gtx.init(params)._replace(structure=base.TreeStructure(jax.tree.structure(params)))
    rj.ungroup_state(gtx, unchecked, params)
    with pytest.raises(ValueError, match=r"^rmsjax\.ungroup_state: the state's nu .* has shape"):
        rj.ungroup_state(gtx, unchecked, wrong)


# Every wrapper but accumulate_gradients keeps a fused step around a rule; that one
# updates the parameters after its lax.cond, where XLA cannot contract the update into
# the inner step's last multiply.
WRAPPERS = sorted([*registry.WRAPPERS, "inject_hyperparams"])


def _fuses(tx) -> bool:
    """Whether update_and_apply runs ``tx`` with the parameter update in its own loop."""
    return fusion.fused_step_of(tx) is not None


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("rule", sorted(registry.cases("rule")))
def test_every_wrapper_around_every_rule_keeps_its_fused_step(wrapper, rule):
    # update_and_apply (and so make_train_step) takes the fused path through every
    # wrapper that can fuse, and gives the unfused chain's numbers bit for bit.
    tx = registry.wrapped(wrapper, registry.cases("rule")[rule])
    assert _fuses(tx) == (wrapper != "accumulate_gradients")
    params = trees.mixed_params()
    grads = trees.gradient_sequence(params, 4, seed=11)
    fused_step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))

    @jax.jit
    def plain_step(p, s, g):
        updates, s = tx.update(g, s, p)
        return rj.apply_updates(p, updates), s

    fused = plain = (params, tx.init(params))
    for g in grads:
        fused = fused_step(*fused, g)
        plain = plain_step(*plain, g)
    chex.assert_trees_all_equal(fused, plain)


def test_update_objects_behave_as_functions_and_say_what_they_can_do():
    tx = rj.rmsprop(0.1)
    update = tx.update
    # called, jitted, inspected and hashed as the function it wraps
    assert "**extra" in str(inspect.signature(update))
    assert update.__name__ == "update_fn"
    assert (
        "jit_update_fn"
        in jax.jit(update).lower(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2)).as_text()[:200]
    )
    assert hash(update) == hash(update) and update != rj.rmsprop(0.1).update
    assert repr(update) == "<rmsjax update: rule rmsprop, fused>"
    assert repr(rj.accumulate_gradients(tx, 2).update) == (
        "<rmsjax update: wrapper accumulate_gradients, unfused>"
    )
    assert repr(rj.grouped(tx).update) == "<rmsjax update: rule rmsprop, fused, grouped state>"


def test_an_optax_transformation_has_no_capabilities_and_runs_unfused():
    optax = pytest.importorskip("optax")
    tx = optax.rmsprop(0.1)
    assert fusion.fused_step_of(tx) is None and fusion.leaf_rule_of(tx) is None
    params = trees.mixed_params()
    g = trees.gradient_sequence(params, 1, seed=2)[0]
    state = tx.init(params)
    got = rj.update_and_apply(tx, g, state, params)
    updates, new_state = tx.update(g, state, params)
    chex.assert_trees_all_equal(got, (optax.apply_updates(params, updates), new_state))
