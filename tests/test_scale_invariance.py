"""RMSprop's and Adagrad's steps do not depend on the scale of the gradients.

Multiplying every gradient of a run by ``c`` changes the updates only through ``eps``
(and a non-zero initial moment): never through a square that overflows or underflows.
Each run here is compared with the float64 NumPy transcription of the equations
(tests/reference.py) on the same scaled gradients, for ``c`` from 1e-30 to 1e30.
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsjax as rj
from rmsjax._src import numerics
from tests import reference
from tests.test_factored import factored_reference
from tests.test_rowwise import rowwise_reference

SHAPE = (64, 64)  # the smallest size int8 storage quantizes; factored and row-wise
STEPS = 6

# name -> (rmsjax transformation from (eps, storage), float64 reference from (grads, eps))
RULES = {
    "rms": (
        lambda eps, storage: rj.scale_by_rms(decay=0.9, eps=eps, storage=storage),
        lambda grads, eps: reference.rms(grads, 0.9, eps),
    ),
    "rms, eps outside, bias-corrected": (
        lambda eps, storage: rj.scale_by_rms(
            decay=0.99, eps=eps, eps_in_sqrt=False, bias_correction=True, storage=storage
        ),
        lambda grads, eps: reference.rms(grads, 0.99, eps, eps_in_sqrt=False, bias_correction=True),
    ),
    "rms centered": (
        lambda eps, storage: rj.scale_by_rms(decay=0.9, eps=eps, centered=True, storage=storage),
        lambda grads, eps: reference.rms(grads, 0.9, eps, centered=True),
    ),
    "rmsprop with momentum": (
        lambda eps, storage: rj.rmsprop(1.0, eps=eps, momentum=0.9, storage=storage),
        lambda grads, eps: reference.rmsprop(grads, 1.0, eps=eps, momentum=0.9),
    ),
    "rss": (
        lambda eps, storage: rj.scale_by_rss(0.0, eps=eps, storage=storage),
        lambda grads, eps: reference.rss(grads, 0.0, eps),
    ),
    "rowwise adagrad": (
        lambda eps, storage: rj.scale_by_rowwise_rss(0.0, eps=eps),
        lambda grads, eps: rowwise_reference(grads, 0.0, eps)[0],
    ),
    "factored rms": (
        lambda eps, storage: rj.scale_by_factored_rmsprop(0.9, eps=eps),
        lambda grads, eps: factored_reference(grads, 0.9, eps)[0],
    ),
    "torch rmsprop": (
        lambda eps, storage: rj.compat.torch_rmsprop(lr=1.0, eps=eps),
        lambda grads, eps: reference.rmsprop(grads, 1.0, decay=0.99, eps=eps, eps_in_sqrt=False),
    ),
}

# Largest difference to the float64 run, as a fraction of the largest float64 update
# of the step: float32 rounding; bfloat16 state (8 bits) or parameters; 8-bit state.
TOLERANCE = {None: 1e-5, "float32": 1e-5, "bfloat16": 3e-2, "int8": 0.25}


def _gradients(seed: int) -> np.ndarray:
    """Gradients spanning several decades within a leaf, some of them zero."""
    rng = np.random.default_rng(seed)
    grads = rng.normal(size=(STEPS, *SHAPE)) * np.exp(2 * rng.normal(size=(STEPS, *SHAPE)))
    grads[:, :2, :8] = 0.0
    return np.clip(grads, -1e3, 1e3)


@functools.cache
def _step(rule: str, eps: float, storage: str | None):
    tx = RULES[rule][0](eps, storage)
    return tx, jax.jit(tx.update)


def _run(rule: str, eps: float, storage: str | None, grads: np.ndarray, dtype):
    tx, update = _step(rule, eps, storage)
    params = jnp.zeros(SHAPE, dtype)
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = update(jnp.asarray(g, dtype), state, params)
        out.append(np.asarray(updates, np.float64))
    return out, state


def _assert_matches_reference(rule, eps, storage, dtype, scale, seed, grads=None):
    grads = (_gradients(seed) if grads is None else grads) * scale
    grads = np.asarray(jnp.asarray(grads, dtype), np.float64)  # what the run sees
    got, state = _run(rule, eps, storage, grads, dtype)
    want = RULES[rule][1](list(grads), eps)
    tolerance = TOLERANCE[storage] if dtype == jnp.float32 else 3e-2
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert np.all(np.isfinite(g)), (rule, storage, scale, step)
        error = np.max(np.abs(g - w)) / np.max(np.abs(w))
        assert error <= tolerance, (rule, storage, dtype, scale, step, error)
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf))), (rule, storage, scale)


@settings(max_examples=40, deadline=None)
@given(
    rule=st.sampled_from(sorted(RULES)),
    storage=st.sampled_from([None, "float32", "bfloat16", "int8"]),
    exponent=st.integers(-30, 30),
    eps=st.sampled_from([0.0, 1e-8]),
    seed=st.integers(0, 3),
)
def test_float32_steps_follow_the_equations_at_every_scale(rule, storage, exponent, eps, seed):
    if rule in ("torch rmsprop", "rowwise adagrad", "factored rms"):
        storage = None  # these keep float32 state (or the preset's), no storage option
    _assert_matches_reference(rule, eps, storage, jnp.float32, 10.0**exponent, seed)


@settings(max_examples=15, deadline=None)
@given(
    rule=st.sampled_from(["rms", "rss", "rmsprop with momentum", "rowwise adagrad"]),
    dtype=st.sampled_from([jnp.bfloat16, jnp.float16]),
    exponent=st.integers(-2, 1),
    seed=st.integers(0, 3),
)
def test_half_precision_steps_follow_the_equations_up_to_the_dtype_maximum(
    rule, dtype, exponent, seed
):
    # Gradients up to 1e3 * 10**1 = 1e4 (float16's maximum is 65504), state in the
    # parameters' dtype; bfloat16 shares float32's range, float16 does not.
    _assert_matches_reference(rule, 0.0, None, dtype, 10.0**exponent, seed)


@pytest.mark.parametrize("storage", [None, "bfloat16", "int8"])
@pytest.mark.parametrize("rule", ["rss", "rms", "rmsprop with momentum", "rms centered"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_steps_follow_the_equations_up_to_float32s_maximum(rule, storage, eps):
    # Gradients up to 3e38, and two blocks of 256 whose gradients stay between 2.1e38
    # and 3e38: their Adagrad sums pass float32's maximum squared (1.2e77) at the third
    # step, where an int8 block's largest root passes float32's maximum (such a block
    # keeps its roots in units of 2^76 instead).
    grads = _gradients(1)
    rng = np.random.default_rng(2)
    large = grads[:, 8:16, :]
    grads[:, 8:16, :] = np.sign(large + 0.5) * 1e3 * rng.uniform(0.7, 1.0, large.shape)
    _assert_matches_reference(rule, eps, storage, jnp.float32, 3e38 / 1e3, 1, grads)


@pytest.mark.parametrize("scale", [1e-30, 1e30, 3e38])
@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.rmsprop(0.01),
        lambda: rj.rmsprop(0.01, momentum=0.9),
        lambda: rj.rmsprop(0.01, centered=True, momentum=0.9),
        lambda: rj.rmsprop(0.01, centered=True, momentum=0.9, storage="int8"),
        lambda: rj.rmsprop(0.01, momentum=0.9, storage="int8"),
        lambda: rj.adagrad(0.01, initial_accumulator_value=0.0, eps=0.0),
        lambda: rj.adagrad(0.01, storage="int8"),
        lambda: rj.adagrad(0.01, storage="bfloat16"),
        lambda: rj.compat.torch_rmsprop(lr=0.01),
        lambda: rj.rowwise_adagrad(0.01, eps=0.0),
        lambda: rj.factored_rmsprop(0.01, momentum=0.9),
    ],
)
def test_a_constant_huge_or_tiny_gradient_steps_by_the_documented_bound(make, scale):
    # rmsprop(0.01) steps by at most lr / sqrt(1 - decay) = 0.0316 without momentum,
    # whatever the gradient's size (eps aside); momentum 0.9 adds at most 10x, and the
    # centered variance of this gradient at most 3x.
    tx = make()
    params = jnp.zeros(SHAPE)
    state = tx.init(params)
    update = jax.jit(tx.update)
    wave = 1 + 0.5 * np.sin(np.arange(5))  # not constant: centered steps need a variance
    for step in range(5):
        grads = jnp.full(SHAPE, scale * wave[step] / 1.5, jnp.float32)
        updates, state = update(grads, state, params)
        assert np.all(np.isfinite(np.asarray(updates)))
        assert float(jnp.max(jnp.abs(updates))) <= 0.0316 * 10 * 3
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf)))
    if scale != 1e-30:  # with eps=1e-8 a gradient of 1e-30 rightly barely moves
        assert float(jnp.min(jnp.abs(updates))) > 1e-3


def _hostile_gradients(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Finite float32 gradients of one of five kinds: magnitudes spread over all of
    float32's range, float32's largest and smallest numbers mixed in one block, one
    spike among zeros, ordinary noise at a random scale, or mostly zeros."""
    kind = rng.integers(0, 5)
    magnitudes = 10.0 ** rng.uniform(-45, 38.5, size=shape)
    if kind == 0:
        x = magnitudes
    elif kind == 1:
        x = np.where(rng.uniform(size=shape) < 0.5, 3.4e38, rng.choice([1e-45, 1.2e-38, 0.0]))
    elif kind == 2:
        x = np.zeros(shape)
        x.flat[rng.integers(0, x.size)] = 3.4e38
    elif kind == 3:
        x = rng.normal(size=shape) * 10.0 ** rng.uniform(-30, 30)
    else:
        x = np.where(rng.uniform(size=shape) < 0.9, 0.0, magnitudes)
    x = x * rng.choice([-1.0, 1.0], size=shape)
    return np.clip(x, -3.4e38, 3.4e38).astype(np.float32)


# The rules whose step has a bound whatever the gradients, and the bound: RMSprop's
# average holds at least (1 - decay) g^2 of the current gradient, Adagrad's sum all of
# g^2, a row-wise sum the row's mean of g^2 (so an element is at most sqrt(row length)
# times its row's root mean square). Momentum m multiplies the bound by 1 / (1 - m).
# Centered RMSprop (a variance can be 0) and the factored estimate (it can be far under
# an element's own average) have none: docs/numerics.md.
BOUNDED = {
    "rmsprop": (lambda storage: rj.rmsprop(0.01, storage=storage), 0.01 / 0.1**0.5),
    "rmsprop eps=0, eps outside, bias-corrected": (
        lambda storage: rj.rmsprop(
            0.01, decay=0.99, eps=0.0, eps_in_sqrt=False, bias_correction=True, storage=storage
        ),
        0.01 / 0.01**0.5,
    ),
    "rmsprop with momentum": (
        lambda storage: rj.rmsprop(0.01, momentum=0.9, storage=storage),
        0.01 / 0.1**0.5 / 0.1,
    ),
    "adagrad": (lambda storage: rj.adagrad(0.01, storage=storage), 0.01),
    "adagrad eps=0": (
        lambda storage: rj.adagrad(0.01, initial_accumulator_value=0.0, eps=0.0, storage=storage),
        0.01,
    ),
    "torch rmsprop": (lambda storage: rj.compat.torch_rmsprop(0.01, storage=storage), 0.1),
    "tf1 rmsprop": (lambda storage: rj.compat.tf1_rmsprop(0.01, storage=storage), 0.01 / 0.1**0.5),
    "keras adagrad": (lambda storage: rj.compat.keras_adagrad(0.01, storage=storage), 0.01),
    "row-wise adagrad": (lambda storage: rj.rowwise_adagrad(0.01, eps=0.0), 0.01 * 64**0.5),
}


@pytest.mark.parametrize(
    "name,storage",
    [
        (name, storage)
        for name in BOUNDED
        # row-wise state is one float32 number per row: it takes no storage option
        for storage in ([None] if name == "row-wise adagrad" else [None, "bfloat16", "int8"])
    ],
)
def test_hostile_gradients_step_within_the_rules_bound(name, storage):
    # Not constant, unlike the test above: each step's gradients mix magnitudes from
    # float32's smallest to its largest, in the same 256-element blocks. Every update
    # and every float in the state stays finite, and no update passes the bound (1%
    # over it for bfloat16 state, whose rounding of the new average reaches the step).
    make, bound = BOUNDED[name]
    tx = make(storage)
    params = {"matrix": jnp.zeros(SHAPE), "odd": jnp.zeros((4097,)), "small": jnp.zeros((3, 5))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(sum(map(ord, name)))
    for _ in range(10):
        grads = {key: jnp.asarray(_hostile_gradients(rng, p.shape)) for key, p in params.items()}
        updates, state = update(grads, state, params)
        for leaf in jax.tree.leaves(updates):
            assert np.all(np.isfinite(np.asarray(leaf)))
            assert float(jnp.max(jnp.abs(leaf))) <= bound * 1.01
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("storage", [None, "bfloat16", "int8"])
def test_a_trace_of_raw_gradients_overflows_where_its_true_value_does(storage):
    # the documented limit: g + 0.9 * trace passes float32's maximum at the second step
    # for a constant gradient of 2e38 (optax's trace too), and stays finite at 3e37
    import optax

    for g, finite_steps in [(2e38, 1), (3e37, 30)]:
        ours, theirs = rj.trace(0.9, storage=storage), optax.trace(0.9)
        params = jnp.zeros(SHAPE)
        state, their_state = ours.init(params), theirs.init(params)
        grads = jnp.full(SHAPE, g, jnp.float32)
        for step in range(30):
            updates, state = jax.jit(ours.update)(grads, state)
            their_updates, their_state = jax.jit(theirs.update)(grads, their_state)
            finite = bool(jnp.all(jnp.isfinite(updates)))
            assert finite == (step < finite_steps), (g, step)
            assert finite == bool(jnp.all(jnp.isfinite(their_updates))), (g, step)


def test_zero_eps_with_tiny_gradients_steps_like_with_ordinary_ones():
    # Down to about 1e-37 exactly (below, see the test of float32's smallest gradients).
    g = jnp.array([1e-30, -3e-25, 1e-36, 0.0], jnp.float32)
    updates, _ = jax.jit(rj.rmsprop(0.1, eps=0.0).update)(g, rj.rmsprop(0.1, eps=0.0).init(g))
    np.testing.assert_allclose(updates, [-0.1 / 0.1**0.5, 0.1 / 0.1**0.5, -0.1 / 0.1**0.5, 0], 1e-6)
    tx = rj.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0)
    updates, _ = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_allclose(updates, [-0.1, 0.1, -0.1, 0.0], 1e-6)


@pytest.mark.parametrize("storage", [None, "bfloat16", "int8"])
@pytest.mark.parametrize(
    "decay,momentum,centered", [(0.9, None, False), (0.9, None, True), (1 - 2**-24, 0.9, False)]
)
def test_gradients_near_float32s_smallest_step_finitely_with_zero_eps(
    storage, decay, momentum, centered
):
    # RMSprop's moment (1 - decay) g^2 falls under 2^-252, where its root is no normal
    # number, for gradients near float32's smallest (and for larger ones as decay nears
    # 1): it is held as 2^-252 instead of 0, and the step stays finite and at most
    # lr / sqrt(1 - decay) (the momentum adds at most 1 / (1 - momentum))
    lr = 0.1
    tx = rj.rmsprop(lr, decay=decay, eps=0.0, momentum=momentum, centered=centered, storage=storage)
    g = jnp.tile(jnp.array([2e-38, -1.2e-38, 1e-37, -1e-35, 1e-30], jnp.float32), 1000)
    # (centered: a constant gradient's first variance is decay (1 - decay) g^2)
    spread = decay * (1 - decay) if centered else 1 - decay
    state, bound = tx.init(g), lr / spread**0.5 / (1 - (momentum or 0)) * 1.01
    for _ in range(3):
        updates, state = jax.jit(tx.update)(g, state)
        assert np.all(np.isfinite(np.asarray(updates)))
        assert np.all(np.abs(np.asarray(updates)) <= bound)
        assert np.all(np.sign(np.asarray(updates)) == -np.sign(np.asarray(g)))
    if decay == 0.9 and not centered and storage is None:  # 1e-37 and up: exact
        # (int8 blocks hold 2^-22 of their largest root; 1e-37 lies 2^-23 under 1e-30's)
        np.testing.assert_allclose(np.abs(updates[2:5]), lr / np.sqrt(1 - 0.9**3), rtol=0.02)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.rmsprop(0.1, decay=0.0, eps=0.0),
        lambda: rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, decay=0.0, eps=0.0),
        lambda: rj.rmsprop(0.1, decay=0.0, eps=0.0, storage="int8"),
        lambda: rj.compat.torch_rmsprop(lr=0.1, alpha=0.0, eps=0.0),
    ],
)
def test_a_decay_of_zero_forgets_a_moment_beyond_float32(make):
    # with decay 0 the old moment has weight 0; beyond float32 it reads as inf in the
    # ordinary formula, and 0 * inf made every later moment and step NaN
    tx = make()
    params = jnp.zeros(SHAPE)
    state = tx.init(params)
    for scale in (3e38, 3e38, 1.0, 3e38, 0.5):
        grads = jnp.full(SHAPE, scale, jnp.float32)
        updates, state = jax.jit(tx.update)(grads, state, params)
        np.testing.assert_allclose(updates, -0.1, rtol=1e-6)  # lr g / sqrt(g^2)


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
@pytest.mark.parametrize("g", [1e18, -3e29, 1e30])
def test_a_zero_centered_variance_steps_by_g_over_eps_beyond_float32(eps_in_sqrt, g):
    # decay 0: the variance is 0 by the equations and the step lr g / eps (or / sqrt
    # eps); beyond float32's squares eps counted as 0 and the step was infinite. Under
    # jit XLA may round g^2 and mu^2 apart (a fused multiply-add), and the variance is
    # then that rounding (docs/porting.md, centered RMSprop with rho=0): finite.
    tx = rj.rmsprop(0.01, decay=0.0, eps=1e-8, centered=True, eps_in_sqrt=eps_in_sqrt)
    params = jnp.zeros(())
    grads = jnp.float32(g)
    expected = -0.01 * g / (np.sqrt(1e-8) if eps_in_sqrt else 1e-8)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(float(updates), expected, rtol=1e-6)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.isfinite(float(updates)) and np.sign(float(updates)) == -np.sign(g)


def test_ordinary_state_is_the_moment_itself_and_huge_state_decodes():
    tx = rj.scale_by_rms(decay=0.5)
    g = jnp.array([2.0, 1e30], jnp.float32)
    _, state = jax.jit(tx.update)(g, tx.init(g))
    assert float(state.nu[0]) == 2.0  # 0.5 * 2^2, held as itself, as optax holds it
    assert float(state.nu[1]) < 0  # 0.5e60 does not fit a float32: held scaled
    shift = numerics.moment_range(jnp.float32).shift
    np.testing.assert_allclose(-float(state.nu[1]) * 2.0 ** (2 * shift), 0.5e60, 1e-6)
    assert float(numerics.decode_moment(state.nu)[1]) == np.inf  # beyond float32


@settings(max_examples=30, deadline=None)
@given(
    k=st.one_of(st.integers(-160, 160), st.integers(-600, 600), st.sampled_from([-256, 256])),
    seed=st.integers(0, 1000),
)
def test_exponent_scaling_is_ldexp_where_the_result_is_normal(k, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=64) * 2.0 ** rng.integers(-126, 127, size=64)).astype(np.float32)
    x[:4] = [0.0, np.inf, -np.inf, np.nan]
    tiny, top = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    x[(np.abs(x) < tiny) & (x != 0)] = 1.0  # normal inputs (XLA CPU flushes the others)
    want = np.ldexp(x.astype(np.float64), k)
    normal = (np.abs(want) >= tiny) & (np.abs(want) <= top)
    finite = np.isfinite(x)
    for got in (
        numerics.scale_exponent(jnp.asarray(x), k),
        numerics.scale_exponent(jnp.asarray(x), jnp.int32(k)),
    ):
        got = np.asarray(got, np.float64)
        np.testing.assert_array_equal(got[normal], want[normal])
        np.testing.assert_array_equal(got[np.abs(want) < tiny], 0.0)
        assert np.all(np.isinf(got[finite & (np.abs(want) > top)]))
        np.testing.assert_array_equal(got[1:3], x[1:3])  # inf and -inf
        assert np.isnan(got[3])
    nonzero = finite & (x != 0)
    shifted = np.asarray(numerics.shift_bits(jnp.asarray(np.abs(x)), k), np.float64)
    np.testing.assert_array_equal(shifted[nonzero & normal], np.abs(want[nonzero & normal]))
    assert np.all(np.abs(shifted[nonzero & (np.abs(want) < tiny)]) < tiny)  # 0 or subnormal
    assert np.all(np.isinf(shifted[nonzero & (np.abs(want) > top)]))


def test_the_numerics_guide_example_runs_and_says_what_it_prints(capsys):
    text = (pathlib.Path(__file__).parent.parent / "docs" / "numerics.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/numerics.md", "exec"), namespace)
    np.testing.assert_allclose(namespace["updates"], np.full(3, -0.01 / np.sqrt(0.1)), 1e-6)
    assert "-0.0316" in capsys.readouterr().out


@pytest.mark.parametrize("exponent", [-30, -24])
@pytest.mark.parametrize(
    "rule",
    ["rms", "rms, eps outside, bias-corrected", "rms centered", "rmsprop with momentum", "rss"],
)
def test_int8_blocks_holding_zeros_keep_tiny_moments(rule, exponent):
    # With eps=0 and gradients near 1e-24 the moments are held as their roots (the tiny
    # encoding), far below sqrt of float32's smallest normal. The gradients hold zeros:
    # a zero's root once counted as 2^-63 when a block's scale was taken, which rounded
    # every root of the block to zero and sent the next step to 1/sqrt(1 - decay).
    _assert_matches_reference(rule, 0.0, "int8", jnp.float32, 10.0**exponent, seed=1)


def test_float16_moments_under_its_smallest_root_keep_the_step_finite():
    # a float16 slot holds roots under its smallest normal number, 6.1e-5, as subnormals
    g = jnp.array([1e-4, 3e-5, 1e-5, 2e-6, 1.0], jnp.float16)
    for tx in (rj.rmsprop(0.1, eps=0.0), rj.rmsprop(0.1, eps=0.0, centered=True)):
        state = tx.init(g)
        for _ in range(3):
            updates, state = jax.jit(tx.update)(g, state)
            u = np.asarray(updates, np.float32)
            assert np.all(np.isfinite(u)) and np.all(u < 0)
            assert np.all(-u <= 0.1 / np.sqrt(0.9 * 0.1) * 1.01)


@pytest.mark.parametrize("rule", ["rss", "rms", "rms centered", "rmsprop with momentum"])
def test_float16_steps_follow_the_equations_over_its_whole_normal_range(rule):
    # README: float16 gradients from its smallest normal number, 6.1e-5, to its largest,
    # 65504, step as the equations say (with eps=0, the same step at every scale).
    # Below 6.1e-5 (subnormal float16) they do not: numerics.md, "float16".
    rng = np.random.default_rng(5)
    size = (STEPS, *SHAPE)
    magnitudes = np.exp(rng.uniform(np.log(6.2e-5), np.log(6.5e4), size))
    grads = np.where(rng.random(size) < 0.5, -magnitudes, magnitudes)
    grads[:, :2, :8] = 0.0
    _assert_matches_reference(rule, 0.0, None, jnp.float16, 1.0, 0, grads)
