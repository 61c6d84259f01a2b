"""Every core rule and alias against the float64 NumPy reference and against optax."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj
from tests import optax_checks, reference, registry, trees

TOLERANCE = {
    jnp.float32: dict(rtol=2e-5, atol=1e-7),
    # bfloat16 keeps 8 significant bits and the state is rounded to it every step.
    jnp.bfloat16: dict(rtol=4e-2, atol=1e-3),
}


def run_updates(tx, params, grads, *, jit=True, with_params=True):
    """The update trees ``tx`` emits for a sequence of gradients."""
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    out = []
    for g in grads:
        u, state = update(g, state, params if with_params else None)
        out.append(u)
    return out


def reference_updates(fn, grads):
    """Runs a reference (one array at a time) over every leaf of the gradient trees."""
    per_leaf = list(zip(*[[np.asarray(x, np.float64) for x in jax.tree.leaves(g)] for g in grads]))
    results = [fn(list(seq)) for seq in per_leaf]
    return [[results[leaf][step] for leaf in range(len(results))] for step in range(len(grads))]


def assert_matches_reference(tx, fn, dtype=jnp.float32, steps=trees.STEPS, first=0):
    params = trees.mixed_params(dtype)
    grads = trees.gradient_sequence(params, steps)
    got = run_updates(tx, params, grads)
    want = reference_updates(fn, grads)
    for step, (g_tree, w_leaves) in enumerate(zip(got, want)):
        if step < first:
            continue
        g_leaves = jax.tree.leaves(g_tree)
        assert len(g_leaves) == len(w_leaves)
        for g, w in zip(g_leaves, w_leaves):
            assert g.dtype == dtype
            # Errors are measured against the leaf's scale: momentum sums values of
            # either sign, and a small result of large terms carries their rounding.
            tol = TOLERANCE[dtype]
            np.testing.assert_allclose(
                np.asarray(g, np.float64),
                w,
                rtol=tol["rtol"],
                atol=tol["atol"] + tol["rtol"] * np.max(np.abs(w)),
                err_msg=f"step {step}",
            )


RMS_FLAGS = [
    dict(eps_in_sqrt=a, bias_correction=b, centered=c, initial_scale=s)
    for a, b, c, s in itertools.product([True, False], [False, True], [False, True], [0.0, 1.0])
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "flags", RMS_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items())
)
def test_scale_by_rms_matches_reference(flags, dtype):
    tx = rj.scale_by_rms(decay=0.9, eps=1e-6, **flags)
    ref = functools.partial(reference.rms, decay=0.9, eps=1e-6, **flags)
    # Centered with bias correction, step 1's variance is exactly g^2 - g^2 = 0: in float32
    # (in every library) it is rounding noise divided by sqrt(eps), so compare from step 2.
    first = 1 if flags["centered"] and flags["bias_correction"] else 0
    assert_matches_reference(tx, ref, dtype, first=first)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("initial", [0.1, 0.0])
def test_scale_by_rss_matches_reference(initial, eps_in_sqrt, dtype):
    tx = rj.scale_by_rss(initial, 1e-7, eps_in_sqrt=eps_in_sqrt)
    ref = functools.partial(
        reference.rss, initial_accumulator_value=initial, eps=1e-7, eps_in_sqrt=eps_in_sqrt
    )
    assert_matches_reference(tx, ref, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_matches_reference(nesterov, dtype):
    tx = rj.trace(0.9, nesterov=nesterov)
    assert_matches_reference(
        tx, functools.partial(reference.trace, decay=0.9, nesterov=nesterov), dtype
    )


@pytest.mark.parametrize("debias", [True, False])
def test_ema_matches_reference(debias):
    tx = rj.ema(0.8, debias=debias)
    assert_matches_reference(tx, functools.partial(reference.ema, decay=0.8, debias=debias))


ALIASES = registry.cases("reference")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ALIASES)
def test_alias_matches_reference(name, dtype):
    case = ALIASES[name]
    assert_matches_reference(case.make(rj), case.reference, dtype)


# ------------------------------------------------------------------------------ optax


def _optax_rms(decay, eps, *, eps_in_sqrt, initial_scale, bias_correction, centered):
    make = optax.scale_by_stddev if centered else optax.scale_by_rms
    return make(decay, eps, initial_scale, eps_in_sqrt, bias_correction)


def assert_same_as_optax(ours, theirs, *, steps=trees.STEPS, jit=True):
    """Bit-identical updates and parameters, step by step, in float32."""
    params = trees.mixed_params()
    grads = trees.gradient_sequence(params, steps, seed=1)
    optax_checks.same_trajectory(ours, theirs, params, grads, jit=jit)


@pytest.mark.parametrize(
    "flags", RMS_FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items())
)
def test_scale_by_rms_bit_identical_to_optax(flags):
    assert_same_as_optax(
        rj.chain(rj.scale_by_rms(0.9, 1e-6, **flags), rj.scale(-0.01)),
        optax.chain(_optax_rms(0.9, 1e-6, **flags), optax.scale(-0.01)),
    )


OPTAX_PAIRS = registry.cases("optax")


@pytest.mark.parametrize("name", OPTAX_PAIRS)
def test_bit_identical_to_optax_under_jit(name):
    make = OPTAX_PAIRS[name].make
    assert_same_as_optax(make(rj), make(optax), steps=25)


@pytest.mark.parametrize("name", OPTAX_PAIRS)
def test_same_as_optax_without_jit(name):
    # Op by op, optax runs its bias correction as a small jitted function whose pow may
    # round differently from the eager op by an ulp, which the centered variance's
    # cancellation can magnify tenfold. Under jit (above) the two agree to the bit.
    ours, theirs = OPTAX_PAIRS[name].make(rj), OPTAX_PAIRS[name].make(optax)
    params = trees.mixed_params()
    s1, s2 = ours.init(params), theirs.init(params)
    for g in trees.gradient_sequence(params, 25, seed=1):
        u1, s1 = ours.update(g, s1, params)
        u2, s2 = theirs.update(g, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            scale = float(np.max(np.abs(b)))  # momentum: small sums of large terms
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_centered_variance_clamped_where_optax_gives_nan():
    # A constant gradient makes the bias-corrected variance round below zero.
    g = {"w": jnp.full((4,), 0.3)}
    ours = rj.scale_by_rms(centered=True, eps_in_sqrt=False, bias_correction=True)
    theirs = optax.scale_by_stddev(eps_in_sqrt=False, bias_correction=True)
    s1, s2 = ours.init(g), theirs.init(g)
    optax_nan = False
    for _ in range(50):
        u1, s1 = ours.update(g, s1)
        u2, s2 = theirs.update(g, s2)
        chex.assert_tree_all_finite(u1)
        optax_nan |= bool(jnp.isnan(u2["w"]).any())
    assert optax_nan, "optax no longer returns NaN here: revisit the docs' claim"


# --------------------------------------------------------------------- closed forms


def test_first_adagrad_step_closed_form():
    g = jnp.array([3.0, -0.25, 1e-3, 0.0])
    tx = rj.adagrad(0.5, initial_accumulator_value=0.0, eps=0.0)
    u, _ = tx.update(g, tx.init(jnp.zeros(4)))
    np.testing.assert_allclose(u, [-0.5, 0.5, -0.5, 0.0], rtol=1e-6)


def test_rmsprop_with_zero_decay_is_sign_like():
    g = jnp.array([4.0, -0.5, 2e-2])
    tx = rj.rmsprop(0.1, decay=0.0, eps=0.0)
    state = tx.init(jnp.zeros(3))
    for _ in range(3):  # decay 0 forgets the past: every step is -lr * sign(g)
        u, state = tx.update(g, state)
        np.testing.assert_allclose(u, [-0.1, 0.1, -0.1], rtol=1e-6)


def test_rms_with_bias_correction_and_eps_outside_equals_adam_without_first_moment():
    params = trees.mixed_params()
    grads = trees.gradient_sequence(params, 30, seed=3)
    ours = run_updates(
        rj.scale_by_rms(0.99, 1e-8, eps_in_sqrt=False, bias_correction=True), params, grads
    )
    adam = run_updates(optax.scale_by_adam(b1=0.0, b2=0.99, eps=1e-8), params, grads)
    for a, b in zip(ours, adam):
        chex.assert_trees_all_close(a, b, rtol=1e-6)


def test_first_rms_step_from_zero():
    g = jnp.array([2.0, -1e-3])
    u, _ = rj.scale_by_rms(decay=0.9, eps=0.0).update(g, rj.scale_by_rms().init(g))
    np.testing.assert_allclose(u, g / jnp.sqrt(0.1 * g * g), rtol=1e-6)


# ------------------------------------------------------------------ composition


HAND_BUILT = registry.cases("fusion")  # each alias with the parts it chains


@pytest.mark.parametrize("name", HAND_BUILT)
def test_alias_equals_hand_built_chain(name):
    case = HAND_BUILT[name]
    alias, hand = case.make(rj), rj.chain(*case.parts(rj))
    params = trees.mixed_params()
    grads = trees.gradient_sequence(params, 20, seed=4)
    s_alias, s_hand = alias.init(params), hand.init(params)
    for g in grads:
        u1, s_alias = alias.update(g, s_alias, params)
        u2, s_hand = hand.update(g, s_hand, params)
        chex.assert_trees_all_equal(u1, u2)
    chex.assert_trees_all_equal_structs(s_alias, s_hand)


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rmsprop_step(self):
        tx = rj.rmsprop(0.1, momentum=0.5)
        params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
        grads = {"a": jnp.array([0.5, 0.25]), "b": jnp.array(-1.0)}
        update = self.variant(tx.update)
        state = tx.init(params)
        u, state = update(grads, state, params)
        # First step: nu = 0.1 g^2, so g / sqrt(nu + 1e-8) ~ sqrt(10) sign(g).
        want = jax.tree.map(lambda g: -0.1 * g / np.sqrt(0.1 * g * g + 1e-8), grads)
        chex.assert_trees_all_close(u, want, rtol=1e-6)
        u, state = update(grads, state, params)
        nu = jax.tree.map(lambda g: 0.19 * g * g, grads)
        second = jax.tree.map(lambda g, n: -0.1 * g / np.sqrt(n + 1e-8), grads, nu)
        chex.assert_trees_all_close(
            u, jax.tree.map(lambda a, b: b + 0.5 * a, want, second), rtol=1e-6
        )


def test_no_recompilation_across_steps():
    tx = rj.rmsprop(rj.schedules.linear_schedule(0.1, 0.0, 100), momentum=0.9, centered=True)
    params = trees.mixed_params()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s, g):
        return rj.update_and_apply(tx, g, s, p)

    state = tx.init(params)
    for g in trees.gradient_sequence(params, 8):
        params, state = step(params, state, g)
    chex.assert_tree_all_finite(params)


def test_optax_transform_inside_rmsjax_chain_and_back():
    params = trees.mixed_params()
    grads = trees.gradient_sequence(params, 10, seed=5)
    ours = rj.chain(optax.clip_by_global_norm(1.0), rj.rmsprop(0.01, momentum=0.9))
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.rmsprop(0.01, momentum=0.9))
    mixed = optax.chain(optax.clip_by_global_norm(1.0), rj.rmsprop(0.01, momentum=0.9))
    states = [t.init(params) for t in (ours, theirs, mixed)]
    for g in grads:
        outs = [t.update(g, s, params) for t, s in zip((ours, theirs, mixed), states)]
        states = [o[1] for o in outs]
        chex.assert_trees_all_equal(outs[0][0], outs[1][0])
        chex.assert_trees_all_equal(outs[2][0], outs[1][0])


def test_extra_arguments_reach_the_parts_that_take_them():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    tx = rj.chain(
        rj.GradientTransformation(rj.EmptyState and (lambda p: rj.EmptyState()), update),
        optax.scale(2.0),
        rj.rmsprop(0.1),
    )
    u, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), None, loss=jnp.array(3.0))
    assert float(seen["loss"]) == 3.0
    np.testing.assert_allclose(u, -0.1 * jnp.sqrt(10.0), rtol=1e-5)


def test_as_optax_is_a_genuine_optax_object():
    tx = rj.as_optax(rj.rmsprop(0.01))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = trees.mixed_params()
    g = trees.gradient_sequence(params, 1)[0]
    chex.assert_trees_all_equal(
        tx.update(g, tx.init(params))[0],
        optax.rmsprop(0.01).update(g, optax.rmsprop(0.01).init(params))[0],
    )


def test_init_through_eval_shape_and_none_leaves():
    tx = rj.rmsprop(0.01, momentum=0.9, centered=True)
    params = trees.mixed_params(jnp.bfloat16)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    concrete = tx.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, concrete)
    assert concrete[0].nu["dense"]["b"] is None
    assert concrete[0].nu["dense"]["w"].dtype == jnp.bfloat16


def test_apply_updates_keeps_dtype_and_none():
    params = {"w": jnp.ones(3, jnp.bfloat16), "skip": None, "s": jnp.float32(1.0)}
    updates = {"w": jnp.full(3, 0.25, jnp.float32), "skip": None, "s": jnp.float32(-2.0)}
    new = rj.apply_updates(params, updates)
    assert new["skip"] is None
    assert new["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new["w"], np.float32), [1.25] * 3)
    assert float(new["s"]) == -1.0


def test_update_and_apply_equals_update_then_apply():
    tx = rj.chain(optax.clip(0.5), rj.rmsprop(0.01, momentum=0.9))  # a non-fusable part too
    params = trees.mixed_params()
    s1 = s2 = tx.init(params)
    p1 = p2 = params
    for g in trees.gradient_sequence(params, 10):
        u, s1 = tx.update(g, s1, p1)
        p1 = rj.apply_updates(p1, u)
        p2, s2 = rj.update_and_apply(tx, g, s2, p2)
    chex.assert_trees_all_equal(p1, p2)
    chex.assert_trees_all_equal(s1, s2)


# ------------------------------------------------------------------- convergence


def _minimise(tx, loss, x0, steps):
    @jax.jit
    def step(x, s):
        g = jax.grad(loss)(x)
        return rj.update_and_apply(tx, g, s, x)

    x, s = x0, tx.init(x0)
    for _ in range(steps):
        x, s = step(x, s)
    return float(loss(x))


def _bowl(x):  # condition number 1e4
    return 0.5 * (100.0 * x[0] ** 2 + 0.01 * x[1] ** 2)


def test_rmsprop_beats_sgd_on_an_ill_conditioned_bowl():
    x0 = jnp.array([1.0, 1.0])
    # sgd is stable only for lr < 2/100, and then barely moves the flat direction.
    sgd_loss = _minimise(rj.sgd(0.019), _bowl, x0, 300)
    # RMSprop steps by about lr in every direction, whatever its curvature; a decaying
    # lr lets it settle instead of hovering lr away from the minimum.
    schedule = rj.schedules.exponential_decay(0.01, transition_steps=100, decay_rate=0.5)
    rms_loss = _minimise(rj.rmsprop(schedule), _bowl, x0, 300)
    assert sgd_loss > 4e-3  # the flat direction has barely moved
    assert rms_loss < 5e-4


def test_rmsprop_momentum_solves_rosenbrock():
    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    x0 = jnp.array([-1.2, 1.0])
    loss = _minimise(
        rj.rmsprop(rj.schedules.exponential_decay(3e-3, 500, 0.5), momentum=0.9),
        rosenbrock,
        x0,
        3000,
    )
    assert loss < 1e-4
    adagrad_loss = _minimise(rj.adagrad(0.05), rosenbrock, x0, 3000)
    assert adagrad_loss < rosenbrock(x0) / 4  # progress, but slowing as its sum grows
