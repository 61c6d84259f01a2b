"""Rounding without bias: bfloat16 second moments, against a NumPy transcription of the
documented rule and against float64 runs of the rules they serve."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from rmsjax._src import rounding
from tests.test_storage import reference_dither


def reference_round_bfloat16(x: np.ndarray) -> np.ndarray:
    """The documented rule in NumPy: add the top 16 bits of the hash of (bits, position)
    to the float32 bits and keep the upper half; non-finite values and
    magnitudes from bfloat16's largest number up round to nearest (even)."""
    x32 = np.ascontiguousarray(x, np.float32)
    bits = x32.view(np.uint32)
    noise = (reference_dither(x32) * 2.0**24).astype(np.uint32) >> np.uint32(8)
    stochastic = (bits + noise) & np.uint32(0xFFFF0000)
    nearest_bits = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    nearest = np.where(np.isnan(x32), bits, nearest_bits & np.uint32(0xFFFF0000))
    fits = (bits & np.uint32(0x7FFFFFFF)) < np.uint32(0x7F7F0000)
    return np.where(fits, stochastic, nearest).view(np.float32)


def as_float32(x: jax.Array) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def test_matches_the_documented_rule_bit_for_bit():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.normal(size=5000) * 10.0 ** rng.uniform(-30, 30, size=5000),
            [0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 3.39e38, -3.4e38, 1e-40, -1e-39],
        ]
    ).astype(np.float32)
    got = as_float32(rounding.round_bfloat16(jnp.asarray(x)))
    want = reference_round_bfloat16(x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_each_value_lands_on_a_neighbour_and_exact_values_stay():
    rng = np.random.default_rng(1)
    x = (rng.uniform(0.5, 1.0, size=20000) * 2.0 ** rng.integers(-100, 100, size=20000)).astype(
        np.float32
    )
    got = as_float32(rounding.round_bfloat16(jnp.asarray(x)))
    down = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    up = (down.view(np.uint32) + np.uint32(0x10000)).view(np.float32)
    assert np.all((got == down) | (got == up))
    exact = jnp.asarray(down)  # bfloat16 holds these: nothing to round
    np.testing.assert_array_equal(as_float32(rounding.round_bfloat16(exact)), down)


@pytest.mark.parametrize("value", [1.0 + 2.0**-10, 3.0 + 2.0**-9, 7e-20, -5.3e15])
def test_rounds_right_on_average(value):
    # One value in 65536 positions: each rounds up with probability = its distance from
    # the lower neighbour over the gap, so the mean is the value (to sampling error).
    x = jnp.full((65536,), value, jnp.float32)
    got = as_float32(rounding.round_bfloat16(x)).astype(np.float64)
    assert len(np.unique(got)) == 2
    gap = float(np.abs(np.diff(np.unique(got))[0]))
    standard_error = gap / 2 / np.sqrt(got.size)
    assert abs(got.mean() - float(np.float32(value))) < 5 * standard_error
    # to nearest, the mean would sit where the nearer neighbour is
    nearest = float(jnp.asarray(value, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    assert abs(nearest - float(np.float32(value))) > 20 * standard_error


def test_deterministic_and_position_dependent():
    x = jnp.full((4096,), 1.0 + 2.0**-9 + 2.0**-12, jnp.float32)
    a = as_float32(rounding.round_bfloat16(x))
    np.testing.assert_array_equal(a, as_float32(rounding.round_bfloat16(x)))
    assert 0.1 < np.mean(a > 1.0 + 2.0**-8) < 0.9  # equal values, different positions


def test_dither_is_uniform_and_independent_of_the_bits_rounded_away():
    # What unbiased rounding needs of the hash, on the inputs a weak hash gets wrong:
    # equal values (only the position varies: a hash without its shift puts their
    # dithers on a line), and a ramp through every pattern of the 16 bits bfloat16 drops
    # (the dither must not follow them). With 65536 elements a correlation's standard
    # error is 0.004; murmur3's finalizer reached 0.016 at most on such inputs.
    ramp = (np.float32(1.5).view(np.uint32) + np.arange(1 << 16, dtype=np.uint32)).view(np.float32)
    for x in (np.full(1 << 16, 1.3, np.float32), np.zeros(1 << 16, np.float32), ramp):
        low_bits = x.view(np.uint32) & 0xFFFF
        for salt in (None, 1, 2, 3, 1000):
            d = np.asarray(rounding.dither(jnp.asarray(x), salt), np.float64)
            counts = np.bincount((d * 64).astype(int), minlength=64)
            chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
            assert chi2 < 120, (salt, chi2)  # 63 degrees of freedom: p < 1e-5 above 120
            if low_bits.std():
                assert abs(np.corrcoef(d, low_bits)[0, 1]) < 0.025
            for lag in (1, 2, 4, 256):
                assert abs(np.corrcoef(d[lag:], d[:-lag])[0, 1]) < 0.025, (salt, lag)


def test_rounding_by_step_is_right_on_average_for_each_element():
    # One element at a time, over 400 steps (salts): each residual of the ramp rounds up
    # as often as its share of the gap says, to sampling error.
    x = (1.0 + np.arange(512) / 512 * 2.0**-7).astype(np.float32)
    rounded = np.stack(
        [as_float32(rounding.round_bfloat16(jnp.asarray(x), salt)) for salt in range(1, 401)]
    )
    share = (x.view(np.uint32) & 0xFFFF) / 65536.0
    up = np.mean(rounded > x, axis=0)
    error = up - share
    assert abs(error.mean()) < 0.01
    assert np.all(np.abs(error) < 5 * 0.5 / np.sqrt(400))


def _moment(slot) -> np.ndarray:
    if isinstance(slot, rj.QuantizedArray):
        slot = rj.dequantize(slot)
    return np.asarray(jnp.asarray(slot, jnp.float32), np.float64)


def _steps(tx, grad, steps):
    params = jnp.zeros(grad.shape)
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(grad, s, params)[1])
    for _ in range(steps):
        state = step(state)
    return state


# The same gradient at every step: a stateless dither would round the same value the
# same way each time, and a moment would stop wherever it rounds down once; the rules'
# step count varies it.
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_low_precision_adagrad_sum_keeps_growing(storage):
    # A constant gradient of 1 adds 1 to a sum of 0.1 at each step: after 2000 steps it
    # is 2000.1. To nearest, bfloat16 drops increments of half its step or less (a tie
    # goes to even) and the sum stops at 256; with an unsalted dither it stopped near
    # 258 (int8: 60).
    grad = jnp.ones((4096,))
    state = _steps(rj.adagrad(0.1, storage=storage), grad, 2000)
    total = _moment(state[0].sum_of_squares)
    assert abs(total.mean() / 2000.1 - 1) < 0.01
    # Each element's sum is a random walk around the true one (unbiased, not exact):
    # its steps are bfloat16's (0.4-0.8%) or the int8 codes' (1.6-3.2% of a sum).
    spread = np.median(np.abs(total / 2000.1 - 1))
    assert spread < (0.06 if storage == "bfloat16" else 0.15)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_low_precision_rmsprop_average_follows_a_slow_decay(storage):
    # With decay 0.999 and a constant gradient of 1 the average from 0 is 1 - 0.999^t:
    # 0.95 after 3000 steps. To nearest, bfloat16 stops at 0.25, where a step's
    # change, 0.001 * (1 - nu), falls under half of its step (unsalted dither: 0.13).
    grad = jnp.ones((4096,))
    state = _steps(rj.rmsprop(0.1, decay=0.999, storage=storage), grad, 3000)
    nu = _moment(state[0].nu)
    want = 1 - 0.999**3000
    assert abs(nu.mean() / want - 1) < 0.01


def test_low_precision_adagrad_counts_its_steps():
    tx = rj.scale_by_rss(storage="bfloat16")
    state = _steps(tx, jnp.ones((8,)), 3)
    assert int(state.count) == 3
    assert rj.scale_by_rss().init(jnp.zeros(8)).count is None
    with pytest.raises(TypeError, match=r"rmsjax\.scale_by_rss\.update: the state's count is None"):
        tx.update(jnp.ones(8), rj.scale_by_rss().init(jnp.zeros(8)))


def test_parameters_in_bfloat16_keep_optax_rounding():
    # Without the storage option a bfloat16 parameter's state is its own dtype and is
    # rounded to nearest, as optax rounds it: the sum stops growing, as optax's does.
    params = jnp.zeros((4096,), jnp.bfloat16)
    grad = jnp.ones((4096,), jnp.bfloat16)
    tx = rj.adagrad(0.1)
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(grad, s, params)[1])
    for _ in range(2000):
        state = step(state)
    assert np.all(_moment(state[0].sum_of_squares) < 1000)


def test_eager_and_jitted_bfloat16_steps_differ_by_one_rounding_at_most():
    # docs/memory.md, "Eager and jitted steps round differently"
    params = jax.random.normal(jax.random.PRNGKey(0), (8192,))
    grads = jax.random.normal(jax.random.PRNGKey(1), (8192,))
    tx = rj.adagrad(0.01, storage="bfloat16")
    state = tx.init(params)
    jitted = np.asarray(jax.jit(tx.update)(grads, state, params)[1][0].sum_of_squares, np.float32)
    with jax.disable_jit():
        eager = np.asarray(tx.update(grads, state, params)[1][0].sum_of_squares, np.float32)
    differ = jitted != eager
    assert 0 < differ.sum() < 0.1 * differ.size
    step = np.abs(jitted[differ] - eager[differ]) / np.abs(eager[differ])
    assert np.all(step <= 2.0**-7)  # one bfloat16 step: 8 significant bits
