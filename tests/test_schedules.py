"""Schedules against optax's, value by value, and against their closed forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj

S = rj.schedules
PAIRS = {
    "constant": (S.constant_schedule(0.3), optax.constant_schedule(0.3)),
    "linear": (S.linear_schedule(1.0, 0.1, 50, 10), optax.linear_schedule(1.0, 0.1, 50, 10)),
    "exponential": (S.exponential_decay(0.1, 7, 0.5, 5), optax.exponential_decay(0.1, 7, 0.5, 5)),
    "exponential-staircase-floor": (
        S.exponential_decay(0.1, 7, 0.5, staircase=True, end_value=0.01),
        optax.exponential_decay(0.1, 7, 0.5, staircase=True, end_value=0.01),
    ),
    "cosine": (
        S.cosine_decay_schedule(0.2, 60, alpha=0.1, exponent=2.0),
        optax.cosine_decay_schedule(0.2, 60, alpha=0.1, exponent=2.0),
    ),
    "warmup-cosine": (
        S.warmup_cosine_decay_schedule(0.0, 1.0, 10, 80, 0.05),
        optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 80, 0.05),
    ),
    "piecewise": (
        S.piecewise_constant_schedule(1.0, {10: 0.5, 30: 0.1}),
        optax.piecewise_constant_schedule(1.0, {10: 0.5, 30: 0.1}),
    ),
}


@pytest.mark.parametrize("name", PAIRS)
def test_schedule_matches_optax(name):
    ours, theirs = PAIRS[name]
    counts = jnp.arange(0, 120, dtype=jnp.int32)
    got = jax.jit(jax.vmap(ours))(counts)
    want = jax.jit(jax.vmap(lambda c: jnp.asarray(theirs(c), jnp.float32)))(counts)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-9)


def test_closed_forms():
    cosine = S.cosine_decay_schedule(2.0, 100)
    for t in (0, 25, 50, 100, 150):
        want = 2.0 * 0.5 * (1 + math.cos(math.pi * min(t, 100) / 100))
        assert float(cosine(t)) == pytest.approx(want, abs=1e-6)
    linear = S.linear_schedule(1.0, 0.0, transition_steps=10, transition_begin=5)
    assert [float(linear(t)) for t in (0, 5, 10, 15, 99)] == pytest.approx([1, 1, 0.5, 0, 0])


def test_schedule_values_beyond_float32_or_below_zero_are_optax_s_and_documented():
    # docs/validation.md: schedule values are not checked; these are optax's numbers
    growing = S.exponential_decay(0.1, 1, decay_rate=1e30)
    assert float(growing(1)) == pytest.approx(1e29, rel=1e-6) and float(growing(2)) == np.inf
    assert float(optax.exponential_decay(0.1, 1, decay_rate=1e30)(2)) == np.inf
    assert float(S.exponential_decay(0.1, 1, decay_rate=1e30, end_value=1.0)(5)) == 1.0
    ours = jax.jit(S.linear_schedule(0.01, 0.0, 1000))(5000)
    theirs = jax.jit(optax.linear_schedule(0.01, 0.0, 1000))(5000)
    assert float(ours) == float(theirs) < 0 and float(ours) == pytest.approx(-4.75e-10, rel=1e-3)
    tx = rj.rmsprop(growing)
    state = tx.init(jnp.zeros(2))
    for _ in range(3):
        updates, state = tx.update(jnp.array([1.0, 0.0]), state)
    assert float(updates[0]) == -np.inf and np.isnan(float(updates[1]))  # 0 * inf


def test_piecewise_boundaries_are_checked_before_they_are_sorted():
    # a string among integer boundaries used to fail inside sorted() with Python's own
    # TypeError; a list of pairs with an AttributeError
    make = S.piecewise_constant_schedule
    with pytest.raises(
        TypeError,
        match=r"^rmsjax\.schedules\.piecewise_constant_schedule: a boundary must be an "
        r"integer >= 0, got '10' \(str\)$",
    ):
        make(1.0, {"10": 0.1, 5: 0.5})
    with pytest.raises(
        TypeError,
        match=r"boundaries_and_scales must be a dict or None, got \[\(10, 0\.1\)\] \(list\)",
    ):
        make(1.0, [(10, 0.1)])
    with pytest.raises(ValueError, match=r"the scale at boundary 10 must be >= 0, got -0\.5"):
        make(1.0, {10: -0.5})
    # NumPy integer boundaries are boundaries, as in optax
    schedule = make(1.0, {np.int64(10): 0.1, 20: 0.5})
    expected = optax.piecewise_constant_schedule(1.0, {10: 0.1, 20: 0.5})
    for t in (0, 9, 10, 19, 20, 25):
        np.testing.assert_allclose(float(schedule(t)), float(expected(t)), rtol=1e-7)


def test_cosine_decay_takes_a_python_count_beyond_int32_as_optax():
    # a Python int count past int32 failed to reach JAX; optax turns it into a float
    ours, theirs = (
        S.cosine_decay_schedule(0.1, 17, alpha=0.2),
        optax.cosine_decay_schedule(0.1, 17, alpha=0.2),
    )
    for count in (3, 2**31, 2**40):
        assert float(ours(count)) == float(theirs(count))


EXTRA_PAIRS = {
    **PAIRS,
    # no warm-up: before step 0 optax holds init_value, as a warm-up of 0 steps
    "cosine-without-warmup": (
        S.warmup_cosine_decay_schedule(0.01, 0.1, 0, 7),
        optax.warmup_cosine_decay_schedule(0.01, 0.1, 0, 7),
    ),
    "linear-late": (S.linear_schedule(0.1, 0.01, 7, 3), optax.linear_schedule(0.1, 0.01, 7, 3)),
}
COUNTS = (-3, 0, 1, 5, 9, 10, 11, 30, 79, 80, 119, 10**6)
COUNT_KINDS = {"int32": jnp.int32, "python int": int, "float32": jnp.float32}


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "x64"])
@pytest.mark.parametrize("name", EXTRA_PAIRS)
def test_schedule_value_dtype_and_weak_type_are_optaxs(name, x64):
    # Under jax_enable_x64 optax's schedules return float64 or float32 depending on their
    # arithmetic (an int32 count divided by an int is float32, multiplied by a float is
    # float64); ours used to return float32 always, so float64 training with a constant,
    # cosine or piecewise schedule drifted from optax's by float32's rounding of the rate.
    ours, theirs = EXTRA_PAIRS[name]
    with jax.enable_x64(x64):
        for kind, make in COUNT_KINDS.items():
            for count in COUNTS:
                raw_got, raw_want = ours(make(count)), theirs(make(count))
                where = f"{name} at {kind} count {count}"
                # an array where optax's is one (constant_schedule returns its value)
                assert isinstance(raw_got, jax.Array) == isinstance(raw_want, jax.Array), where
                got, want = jnp.asarray(raw_got), jnp.asarray(raw_want)
                assert got.dtype == want.dtype, where
                assert got.weak_type == want.weak_type, where
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=where)


@pytest.mark.parametrize("name", ["constant", "cosine", "piecewise", "warmup-cosine", "linear"])
def test_float64_training_with_a_schedule_is_optaxs_bit_for_bit(name):
    ours, theirs = PAIRS[name]
    with jax.enable_x64(True):
        params = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)}
        results = []
        for lib, schedule in ((rj, ours), (optax, theirs)):
            tx = lib.rmsprop(schedule, centered=True)
            p, state = params, tx.init(params)
            for _ in range(12):
                grads = jax.tree.map(lambda w: jnp.sin(3 * w) + 0.1, p)
                updates, state = jax.jit(tx.update)(grads, state, p)
                p = lib.apply_updates(p, updates)
            results.append(np.asarray(p["w"]))
        assert results[0].dtype == np.float64
        np.testing.assert_array_equal(results[0], results[1])


INTEGER_VALUED = {
    "linear": lambda v: rj.schedules.linear_schedule(v(0), v(2), 4),
    "warmup_cosine": lambda v: rj.schedules.warmup_cosine_decay_schedule(v(0), v(2), 2, 8, v(1)),
    "exponential": lambda v: rj.schedules.exponential_decay(v(2), 4, 0.5, end_value=v(1)),
    "cosine": lambda v: rj.schedules.cosine_decay_schedule(v(2), 4, alpha=v(0)),
    "piecewise": lambda v: rj.schedules.piecewise_constant_schedule(v(2), {2: v(0)}),
    "constant": lambda v: rj.schedules.constant_schedule(v(2)),
}


@pytest.mark.parametrize("kind", [np.uint8, jnp.uint8, np.int32])
@pytest.mark.parametrize("name", list(INTEGER_VALUED))
def test_integer_values_schedule_as_their_floats(name, kind):
    # values of any real dtype are numbers; an unsigned 0 - 2 wrapped around to 254, and
    # the warm-up of warmup_cosine_decay_schedule(uint8(0), uint8(2), ...) began at 256
    as_float, as_integer = INTEGER_VALUED[name](float), INTEGER_VALUED[name](kind)
    for count in range(10):
        assert float(as_integer(count)) == float(as_float(count)), count


TRACED_VALUES = {
    # (schedule of a traced value v, the same schedule of a concrete v): every float
    # argument, including the ones optax reads with Python's `if`
    "constant": lambda v: S.constant_schedule(v),
    "linear": lambda v: S.linear_schedule(v, 0.5 * v, 10, 2),
    "exponential": lambda v: S.exponential_decay(v, 7, 0.5, 2, end_value=0.1 * v),
    "exponential-rate": lambda v: S.exponential_decay(0.3, 7, v, end_value=0.1),
    "cosine": lambda v: S.cosine_decay_schedule(v, 10, alpha=0.1 * v, exponent=1 + v),
    "warmup-cosine": lambda v: S.warmup_cosine_decay_schedule(0.1 * v, v, 3, 10, 0.2 * v, 1 + v),
    "warmup-cosine-zero-peak": lambda v: S.warmup_cosine_decay_schedule(0, v - 0.5, 3, 10, 0.1),
    "piecewise": lambda v: S.piecewise_constant_schedule(v, {3: 0.5, 6: 2.0}),
    "piecewise-scale": lambda v: S.piecewise_constant_schedule(0.1, {3: v}),
}


@pytest.mark.parametrize("name", list(TRACED_VALUES))
def test_schedules_of_traced_values_work_under_jit_and_vmap(name):
    # meta-learning and sweeps trace a schedule's values: constant_schedule and
    # piecewise_constant_schedule raised ConcretizationTypeError on a traced value, and
    # the rate of exponential_decay with end_value, warmup_cosine_decay_schedule's peak
    # and a piecewise scale failed with a bare TracerBoolConversionError (as in optax)
    make = TRACED_VALUES[name]
    counts = jnp.arange(14)
    values = np.array([0.5, 2.0], np.float32)  # a rate below and above 1 (a peak of 0)
    traced = jax.jit(jax.vmap(lambda v: jax.vmap(make(v))(counts)))(values)
    for v, row in zip(values, np.asarray(traced)):
        concrete = jax.jit(jax.vmap(make(float(v))))(counts)
        # (XLA folds the concrete values' arithmetic: an ulp or so apart)
        np.testing.assert_allclose(row, concrete, rtol=1e-6, atol=1e-12)


def test_constant_and_piecewise_schedules_return_optax_s_value_as_given():
    # optax's constant_schedule(3) returns the int 3, and piecewise_constant_schedule
    # without boundaries its init_value; rmsjax returned float32 arrays
    assert S.constant_schedule(3)(7) == optax.constant_schedule(3)(7) == 3
    assert isinstance(S.constant_schedule(3)(7), int)
    assert isinstance(S.piecewise_constant_schedule(3)(2), int)
    for count in (0, 5, jnp.int32(5)):
        ours = S.piecewise_constant_schedule(0.3, {4: 0.5})(count)
        theirs = optax.piecewise_constant_schedule(0.3, {4: 0.5})(count)
        assert ours.dtype == theirs.dtype and ours.weak_type == theirs.weak_type
        assert float(ours) == float(theirs)


@pytest.mark.parametrize("end", [1e30, -1e30])
def test_warmup_cosine_from_a_tiny_peak_to_a_huge_end_stays_finite(end):
    # optax's alpha = end / peak overflows float32 and every value after the warm-up
    # is NaN; the cosine between peak and end holds both ends exactly
    schedule = S.warmup_cosine_decay_schedule(0.0, 1e-30, 1, 5, end_value=end)
    assert np.isnan(float(optax.warmup_cosine_decay_schedule(0.0, 1e-30, 1, 5, end)(3)))
    values = np.array([float(schedule(c)) for c in range(8)])
    assert np.all(np.isfinite(values))
    assert values[1] == np.float32(1e-30) and values[5] == values[7] == np.float32(end)
    weights = [0.5 * (1 + math.cos(math.pi * (c - 1) / 4)) for c in (2, 3, 4)]
    np.testing.assert_allclose(values[2:5], [end * (1 - w) for w in weights], rtol=1e-6)
