"""Finite where peers are not; deterministic; differentiable through unrolled steps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj
from tests import reference, trees


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.rmsprop(1e-3, momentum=0.9),
        lambda m: m.rmsprop(1e-3, centered=True),
        lambda m: m.adagrad(1e-2, initial_accumulator_value=0.0),
    ],
)
def test_half_precision_zero_gradients_give_finite_zero_updates(make, dtype):
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.zeros(3, dtype)}
    tx = make(rj)
    state = tx.init(params)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
        chex.assert_tree_all_finite(updates)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal_dtypes(updates, params)


def test_optax_gives_nan_for_float16_zero_gradients():
    # The README's claim, kept honest: eps=1e-8 underflows in float16.
    params = jnp.ones(3, jnp.float16)
    tx = optax.rmsprop(1e-3)
    updates, _ = tx.update(jnp.zeros_like(params), tx.init(params))
    assert bool(jnp.isnan(updates).all())


def test_optax_freezes_huge_gradients_and_steps_by_infinity_on_tiny_ones():
    # The README's comparison, kept honest: optax's g^2 overflows at 1e30 (the update is
    # 0 at every later step) and underflows at 1e-30 (with eps=0: an infinite update).
    g = jnp.array([1e30, 1e-30, 1.0])
    tx = optax.rmsprop(0.01, eps=0.0)
    state = tx.init(g)
    for _ in range(3):
        updates, state = tx.update(g, state)
        assert float(updates[0]) == 0 and np.isinf(float(updates[1]))
    updates, _ = rj.rmsprop(0.01, eps=0.0).update(g, rj.rmsprop(0.01, eps=0.0).init(g))
    np.testing.assert_allclose(updates, np.full(3, -0.01 / np.sqrt(0.1)), rtol=1e-6)


def test_zero_eps_and_zero_second_moment_give_zero_update():
    for tx in (
        rj.rmsprop(0.1, eps=0.0),
        rj.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0),
        rj.rmsprop(0.1, eps=0.0, eps_in_sqrt=False, centered=True),
    ):
        params = jnp.ones(3)
        updates, _ = tx.update(jnp.zeros(3), tx.init(params), params)
        np.testing.assert_array_equal(updates, np.zeros(3))


SUBNORMAL_EPS = {
    "rmsprop": lambda eps: rj.rmsprop(0.01, eps=eps),
    "eps outside the root": lambda eps: rj.rmsprop(0.01, eps=eps, eps_in_sqrt=False),
    "centered, momentum": lambda eps: rj.rmsprop(0.01, eps=eps, centered=True, momentum=0.9),
    "int8 state": lambda eps: rj.rmsprop(0.01, eps=eps, storage="int8"),
    "torch": lambda eps: rj.compat.torch_rmsprop(eps=eps),
    "keras": lambda eps: rj.compat.keras_rmsprop(0.01, epsilon=eps),
    "factored": lambda eps: rj.factored_rmsprop(0.01, eps=eps, min_dim_size_to_factor=2),
}


@pytest.mark.parametrize("eps", [1e-45, 1e-40, 1.1e-38])
@pytest.mark.parametrize("name", list(SUBNORMAL_EPS))
def test_a_subnormal_eps_acts_as_zero_and_a_zero_gradient_still_steps_by_zero(name, eps):
    # XLA on a CPU flushes an eps under float32's smallest normal number to 0: the
    # zero-gradient guard of eps = 0 must hold there too (it was skipped for any eps > 0,
    # and 0 * inf gave NaN); a lone tiny gradient beside a huge one steps finitely
    g = jnp.tile(jnp.array([1.0, 0.0, -0.0, 1e-30, -3e38, 1e-20, 0.5, -2.0]), 512).reshape(64, 64)
    tx = SUBNORMAL_EPS[name](eps)
    state = tx.init(g)
    for _ in range(3):
        u, state = jax.jit(tx.update)(g, state, g)
        assert bool(jnp.isfinite(u).all()), u
        np.testing.assert_array_equal(u[g == 0], 0.0)
        np.testing.assert_array_equal(np.sign(u[g > 1e-10]), -1.0)


def test_factored_with_zero_eps_steps_a_lost_element_by_its_own_first_step():
    # the estimate of an element far under its row and column is 0; it steps by
    # g / sqrt((1 - decay) g^2 + eps), computed without overflow: at eps = 0 that is
    # sign(g) / sqrt(1 - decay) (it was NaN for |g| under about 5e-20), and with eps > 0
    # a vanishing step (it was 0 * inf with eps flushed to 0)
    g = jnp.array([[1.0, 1e-30], [1e-30, -1e-30]])
    for eps in (0.0, 1e-45, 1e-8):
        tx = rj.factored_rmsprop(0.01, eps=eps, min_dim_size_to_factor=2)
        u = np.asarray(jax.jit(tx.update)(g, tx.init(g), g)[0], np.float64)
        np.testing.assert_array_equal(np.sign(u), -np.sign(np.asarray(g)))
        if eps == 0.0:
            np.testing.assert_allclose(np.abs(u), 0.01 / np.sqrt(0.1), rtol=1e-6)
        else:  # eps dominates the tiny elements' root: their steps vanish
            assert np.abs(u[1:, :]).max() < 1e-8 and np.abs(u[0, 1]) < 1e-8
    g = jnp.array([1.0, 1e-20, 0.0])  # not factored: the same fallback
    u = jax.jit(rj.factored_rmsprop(0.01, eps=0.0).update)(
        g, rj.factored_rmsprop(0.01, eps=0.0).init(g), g
    )[0]
    np.testing.assert_allclose(np.asarray(u), [-0.01 / np.sqrt(0.1)] * 2 + [0.0], rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-30])
def test_a_derivative_through_factored_steps_with_tiny_gradients_is_finite(eps):
    # 1 / g of the lost-element fallback, and the root of its zero estimate, made every
    # derivative through the step NaN (0 * inf in the branch not taken)
    tx = rj.factored_rmsprop(0.01, eps=eps, min_dim_size_to_factor=2)

    def loss(g):
        return jnp.sum(tx.update(g, tx.init(g), g)[0])

    for g in (
        jnp.array([[1.0, 0.5], [0.3, 1e-20]]),
        jnp.array([[3e38, 0.5], [0.3, 1e-30]]),
        jnp.array([1.0, 1e-20, 0.0]),
    ):
        assert bool(jnp.isfinite(jax.grad(loss)(g)).all())


def test_a_derivative_through_factored_steps_of_a_leaf_never_moved_is_finite():
    # a leaf whose gradient has always been 0 (a weight at its minimum) has row averages
    # of (1 - decay) eps = 1e-31: JAX's derivative of row / mean(row) squared the mean,
    # which underflowed, and 0 * inf made the whole derivative NaN
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
    start = {"w": jnp.ones((8, 6)), "still": jnp.ones((8, 6))}

    def loss(p):
        return jnp.sum((p["w"] * x) ** 2) + jnp.sum((p["still"] - 1.0) ** 2)

    def after_steps(lr):
        tx = rj.factored_rmsprop(lr, min_dim_size_to_factor=2)
        params, state = start, tx.init(start)
        for _ in range(3):
            params, state = rj.update_and_apply(tx, jax.grad(loss)(params), state, params)
        return loss(params)

    derivative = float(jax.grad(after_steps)(0.01))
    h = 1e-4
    central = (float(after_steps(0.01 + h)) - float(after_steps(0.01 - h))) / (2 * h)
    np.testing.assert_allclose(derivative, central, rtol=1e-3)
    # the step sizes of a fresh state, lr / sqrt((1 - decay) eps), read the same way
    tx = rj.factored_rmsprop(0.01, min_dim_size_to_factor=2)
    sizes = rj.effective_step_sizes(tx, tx.init(start), start)
    np.testing.assert_allclose(np.asarray(sizes["still"]), 0.01 / np.sqrt(0.1 * 1e-30), rtol=1e-5)


def test_centered_zero_variance_with_zero_eps_steps_by_an_infinity_not_a_nan():
    # decay = 0: the variance of every step is g^2 - g^2 = 0 exactly, and eps = 0 adds
    # nothing, so the step is g / 0 by the definition (docs/numerics.md); at decay 0.9
    # the variance of a constant gradient shrinks step by step but is never 0
    g = jnp.array([1.0, -0.5, 0.3, 0.0])
    for decay, finite in ((0.0, False), (0.9, True)):
        tx = rj.rmsprop(0.01, decay=decay, centered=True, eps=0.0)
        state = tx.init(jnp.zeros(4))
        for _ in range(3):
            u, state = jax.jit(tx.update)(g, state)
        assert not bool(jnp.isnan(u).any())
        assert bool(jnp.isfinite(u[:3]).all()) == finite
        np.testing.assert_array_equal(np.sign(u[:3]), -np.sign(g[:3]))
        assert float(u[3]) == 0.0  # a zero gradient: a zero update, variance or not


def test_centered_variance_rounded_to_zero_at_decay_one_half_needs_eps():
    # docs/numerics.md: at decay 0.5 every product is exact, and after 24 steps of a
    # constant gradient nu and mu^2 round to the same float32: the variance is exactly 0
    # although the equations keep it positive. eps = 0 then steps by inf (as optax);
    # eps > 0 by g / sqrt(eps), finite
    for eps, last in ((0.0, -np.inf), (1e-8, -100.0)):
        tx = rj.rmsprop(0.01, decay=0.5, eps=eps, centered=True)
        state, update = tx.init(jnp.zeros(3)), jax.jit(tx.update)
        steps = []
        for _ in range(30):
            u, state = update(jnp.ones(3), state)
            steps.append(float(u[0]))
        if eps == 0:  # the equations' 24th step, the last before the variance is 0
            np.testing.assert_allclose(steps[23], -40.96, rtol=1e-6)
        assert steps[24] == steps[29] == last
        assert not np.isnan(steps).any()


def test_centered_zero_variance_steps_by_g_over_root_eps_up_to_float32_s_maximum():
    # by the equations the variance is 0 at decay 0: the update before the learning rate
    # is g / sqrt(eps), inf past 3.4e38 * sqrt(eps) (docs/numerics.md, "Limits")
    tx = rj.rmsprop(0.01, decay=0.0, centered=True)
    # (where a moment is held scaled its variance may round above 0: 1e34 and 3e38 here)
    g = jnp.array([-1e30, 1e36, 0.0, 1e34, 3e38], jnp.float32)
    u, _ = jax.jit(tx.update)(g, tx.init(jnp.zeros(5)))
    np.testing.assert_allclose(float(u[0]), 1e32, rtol=1e-6)
    assert float(u[1]) == -np.inf and float(u[2]) == 0.0
    assert not bool(jnp.isnan(u).any())
    # without bias correction the variance of a constant gradient is not 0 at decay > 0:
    # steps stay finite and bounded at every scale, with every storage
    for storage in (None, "bfloat16", "int8"):
        tx = rj.rmsprop(0.01, centered=True, storage=storage)
        params = jnp.zeros(4096)
        state, update = tx.init(params), jax.jit(tx.update)
        for _ in range(30):
            u, state = update(jnp.full(4096, 1e36, jnp.float32), state)
            assert float(jnp.max(jnp.abs(u))) < 0.07, storage


@pytest.mark.parametrize("storage", [None, "float32", "bfloat16", "int8"])
def test_centered_decay_zero_steps_by_g_over_root_eps_with_every_storage(storage):
    # decay 0: mu = g and nu = g^2, so the variance is 0 at every step and the update is
    # -lr * g / sqrt(eps). bfloat16 state keeps the variance itself, whose update weighs
    # the gap's square by 4 d (1 - d) = 0; a square beyond float32 (a gradient over
    # 1.8e19) made that 0 * inf = NaN, and the NaN stayed in the state
    # (4096 elements: int8 state quantizes leaves of 4096 or more)
    g = np.tile(np.array([-1e30, 1e20, 1.0, 0.0, -3e-20, 2e19, 7.0, -0.5], np.float32), 512)
    tx = rj.rmsprop(0.01, decay=0.0, centered=True, storage=storage)
    state, update = tx.init(jnp.zeros(g.shape)), jax.jit(tx.update)
    for sign in (1.0, -1.0, 1.0):
        u, state = update(jnp.asarray(sign * g), state)
        np.testing.assert_allclose(np.asarray(u, np.float64), -0.01 * sign * g / 1e-4, rtol=1e-6)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))


def test_centered_variance_never_negative_under_constant_gradients():
    tx = rj.rmsprop(1.0, centered=True, eps=0.0, eps_in_sqrt=False, bias_correction=True)
    params = {"w": jnp.zeros(1000)}
    rng = np.random.default_rng(0)
    g = {"w": jnp.asarray(rng.normal(size=1000) * 10.0 ** rng.uniform(-3, 3, 1000), jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(30):
        u, state = update(g, state)
        # variance 0 and eps 0: g / 0 is +-inf by the definition, but never NaN
        assert not bool(jnp.isnan(u["w"]).any())


@pytest.mark.parametrize("magnitude", [1e30, 1e-30, 1e-38])
def test_extreme_gradients_stay_finite(magnitude):
    params = {"w": jnp.ones(4)}
    g = {"w": jnp.array([1.0, -1.0, 0.5, 0.0]) * magnitude}
    for tx in (
        rj.rmsprop(1e-3, momentum=0.9),
        rj.rmsprop(1e-3, centered=True),
        rj.adagrad(1e-2),
        rj.sgd(1e-40, momentum=0.9),
    ):
        state = tx.init(params)
        p = params
        for _ in range(5):
            p, state = jax.jit(lambda p, s, tx=tx: rj.update_and_apply(tx, g, s, p))(p, state)
            chex.assert_tree_all_finite((p, state))


@pytest.mark.parametrize(
    "name, make, equations",
    [
        (
            "centered",
            lambda: rj.scale_by_rms(decay=0.5, centered=True),
            lambda gs: reference.rms(gs, decay=0.5, centered=True),
        ),
        ("ema", lambda: rj.ema(0.5), lambda gs: reference.ema(gs, 0.5)),
    ],
)
def test_an_average_with_equal_weights_stays_finite_under_jit(name, make, equations):
    # With a decay of 0.5 XLA factors 0.5 * g + 0.5 * mu into 0.5 * (g + mu), whose sum
    # overflows for two gradients near float32's maximum (the average itself does not).
    top = float(np.finfo(np.float32).max)
    grads = [np.array([top, -top, 3.4e38, 2e38, -1.0], np.float32)] * 3
    grads.append(np.array([top, -3e38, -top, 1e-3, 2.0], np.float32))
    tx = make()
    state = tx.init(jnp.zeros(5))
    update = jax.jit(tx.update)
    for g, expected in zip(grads, equations(grads)):
        u, state = update(jnp.asarray(g), state)
        chex.assert_tree_all_finite((u, state))
        np.testing.assert_allclose(
            np.asarray(u, np.float64), expected, rtol=2e-6, atol=1e-30, err_msg=name
        )


def test_tiny_gradients_with_default_eps_match_the_equation():
    g = jnp.array([1e-30, -3e-30])
    u, _ = rj.rmsprop(1.0).update(g, rj.rmsprop(1.0).init(g))
    # g*g underflows to 0, so v = 0 and the update is -g / sqrt(eps), as in float64.
    np.testing.assert_allclose(u, -np.array([1e-30, -3e-30]) / np.sqrt(1e-8), rtol=1e-6)


def test_same_inputs_same_bits_run_after_run():
    params = trees.mixed_params()
    grads = trees.gradient_sequence(params, 10, seed=7)

    def trajectory():
        tx = rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(1e-2, momentum=0.9, centered=True))
        step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
        p, s = params, tx.init(params)
        for g in grads:
            p, s = step(p, s, g)
        return p, s

    first, second = trajectory(), trajectory()
    chex.assert_trees_all_equal(first, second)


def _unrolled_loss(lr, decay, steps=5):
    def loss(w):
        return jnp.sum((w - jnp.array([1.0, -2.0, 0.5])) ** 2 * jnp.array([1.0, 10.0, 0.1]))

    tx = rj.rmsprop(lr, decay=decay, momentum=0.5)
    w = jnp.zeros(3)
    state = tx.init(w)
    for _ in range(steps):
        w, state = rj.update_and_apply(tx, jax.grad(loss)(w), state, w)
    return loss(w)


def test_gradient_through_unrolled_steps_matches_finite_differences():
    with jax.enable_x64(True):
        lr, decay = jnp.float64(0.05), jnp.float64(0.9)
        d_lr, d_decay = jax.grad(_unrolled_loss, argnums=(0, 1))(lr, decay)
        h = 1e-6
        fd_lr = (_unrolled_loss(lr + h, decay) - _unrolled_loss(lr - h, decay)) / (2 * h)
        fd_decay = (_unrolled_loss(lr, decay + h) - _unrolled_loss(lr, decay - h)) / (2 * h)
        np.testing.assert_allclose(d_lr, fd_lr, rtol=1e-5)
        np.testing.assert_allclose(d_decay, fd_decay, rtol=1e-5)
        assert abs(float(d_lr)) > 1e-3 and abs(float(d_decay)) > 1e-3  # not trivially zero


def _loss_at_scale(lr, scale, make):
    # A quadratic whose gradients are `scale` times ordinary ones; its steps, and so the
    # loss of the parameters, do not depend on the scale (eps = 0).
    tx = make(lr)
    w = jnp.zeros(3, jnp.result_type(lr, jnp.float32))
    state = tx.init(w)
    target, weights = jnp.array([1.0, -2.0, 0.5]), jnp.array([1.0, 10.0, 0.1])
    for _ in range(4):
        grads = scale * 2 * weights * (w - target)
        w, state = rj.update_and_apply(tx, grads, state, w)
    return jnp.sum((w - target) ** 2 * weights)


ZERO_EPS = {
    "rmsprop": lambda lr: rj.rmsprop(lr, eps=0.0),
    "centered with momentum": lambda lr: rj.rmsprop(lr, eps=0.0, momentum=0.5, centered=True),
    "adagrad": lambda lr: rj.adagrad(lr, eps=0.0, initial_accumulator_value=0.0),
}


@pytest.mark.parametrize("name", list(ZERO_EPS))
def test_a_gradient_through_steps_with_zero_eps_is_finite_at_every_scale(name):
    # Centered RMSprop with eps = 0 computes the step of a zero variance, g / sqrt(0),
    # in a branch it does not select; its derivative, 0 * inf, made the gradient with
    # respect to the learning rate NaN at every scale. At an ordinary scale it matches
    # central finite differences; where the moments are held scaled by a power of two
    # (gradients of 1e-30 and 1e-36 here) the derivative through the moment is cut at
    # that encoding, a documented limit (docs/numerics.md): finite and within 10%.
    make = ZERO_EPS[name]
    with jax.enable_x64(True):
        lr, h = jnp.float64(0.05), 1e-6
        exact = jax.grad(_loss_at_scale)(lr, 1.0, make)
        fd = (_loss_at_scale(lr + h, 1.0, make) - _loss_at_scale(lr - h, 1.0, make)) / (2 * h)
        np.testing.assert_allclose(float(exact), float(fd), rtol=1e-5)
    grad = jax.jit(jax.grad(_loss_at_scale), static_argnums=2)
    ordinary = float(grad(0.05, 1.0, make))
    for scale in [1e-30, 1e-36]:
        tiny = float(grad(0.05, scale, make))
        assert np.isfinite(tiny)
        np.testing.assert_allclose(tiny, ordinary, rtol=0.1)


TINY_FLOAT64 = {
    "rmsprop": lambda storage: rj.rmsprop(0.01, eps=0.0, storage=storage),
    "momentum": lambda storage: rj.rmsprop(0.01, eps=0.0, momentum=0.5, storage=storage),
    "centered": lambda storage: rj.rmsprop(0.01, eps=0.0, centered=True, storage=storage),
    "adagrad": lambda storage: rj.adagrad(
        0.01, eps=0.0, initial_accumulator_value=0.0, storage=storage
    ),
    "torch": lambda storage: rj.compat.torch_rmsprop(0.01, eps=0.0, storage=storage),
    "grouped": lambda storage: rj.grouped(rj.rmsprop(0.01, eps=0.0, storage=storage)),
}


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("name", list(TINY_FLOAT64))
def test_tiny_float64_gradients_in_float32s_range_step_finitely(name, storage):
    # A float64 leaf whose state has float32's exponent range: a moment under its range
    # is held at float32's smallest normal number. It was held at float64's, which a
    # bfloat16 slot rounds to 0 (and a gradient under ~1e-170 squared to 0 in every
    # slot): the step was g / 0 = -inf, kept in the momentum buffer.
    decay = 0.99 if name == "torch" else 0.9  # torch's alpha
    bound = 0.01 / np.sqrt(1 - decay) if name != "adagrad" else 0.01
    bound /= 0.5 if name == "momentum" else 1
    with jax.enable_x64(True):
        for size in (2, 4096):
            for scale in (1e-20, 1e-37, 3e-38, 1e-100, 1e-300):
                tx = TINY_FLOAT64[name](storage)
                params = jnp.ones(size, jnp.float64)
                grads = jnp.full(size, scale, jnp.float64).at[0].set(-scale)
                state, step = tx.init(params), jax.jit(tx.update)
                for _ in range(3):
                    updates, state = step(grads, state, params)
                u = np.asarray(updates)
                # int8 codes of roots far under their block scale's floor (2^-114) are
                # 6-12% apart: a step may pass the bound by that rounding
                slack = 1.15 if storage == "int8" and size >= 4096 else 1.01
                assert np.all(np.isfinite(u)) and np.all(np.abs(u) <= bound * slack)
                assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)), scale
                root = scale * (np.sqrt(1 - decay) if name != "adagrad" else 1.0)
                normal = root > 2 * np.finfo(np.float32).tiny
                if (normal if storage != "int8" else scale >= 1e-20) and name != "centered":
                    # where the moment's root is a normal float32 number the step is the
                    # equations', within the state's rounding (under it, held at the floor)
                    exact = TINY_FLOAT64[name]("float32")
                    want = np.asarray(exact.update(grads, exact.init(params), params)[0])
                    first = np.asarray(tx.update(grads, tx.init(params), params)[0])
                    np.testing.assert_allclose(first, want, rtol=2e-2)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_huge_float64_gradients_in_float32s_range_step_finitely(storage):
    # A float64 leaf's mean gradient beyond float32 was stored as inf: the next steps of
    # centered RMSprop were NaN (or, at 1e40, 1e42 times the learning rate). The slot
    # holds float32's largest number instead; the variance is then overestimated, so
    # the steps are no larger than the equations'.
    with jax.enable_x64(True):
        for scale in (1e39, 1e40, 1e50, 1e90):
            tx = rj.rmsprop(0.01, centered=True, storage=storage)
            grads = [jnp.array([1.0, -2.0, 3.0]) * scale * (1 + 0.5 * t) for t in range(4)]
            state, step = tx.init(grads[0]), jax.jit(tx.update)
            expected = reference.rms(grads, centered=True)
            for g, want in zip(grads, expected):
                u, state = step(g, state)
                # (a square beyond the state's range is held as inf: the element freezes)
                chex.assert_tree_all_finite((u, state[0].mu))
                assert np.all(np.abs(np.asarray(u)) <= 0.0101 * np.abs(want)), (scale, u, want)
            average = rj.ema(0.9, accumulator_dtype=jnp.float32)
            state = average.init(grads[0])
            for g in grads:
                u, state = jax.jit(average.update)(g, state)
                chex.assert_tree_all_finite((u, state))


def _loss_with_a_frozen_weight(lr, make):
    # The last weight's gradient is always 0 (a parameter the loss does not use).
    tx = make(lr)
    w = jnp.zeros(4, jnp.result_type(lr, jnp.float32))
    state = tx.init(w)
    target, used = jnp.array([1.0, -2.0, 0.5, 0.0]), jnp.array([1.0, 1.0, 1.0, 0.0])
    for _ in range(4):
        w, state = rj.update_and_apply(tx, 2 * used * (w - target), state, w)
    return jnp.sum((w - target) ** 2)


FROZEN = {
    "rmsprop": lambda lr: rj.rmsprop(lr),
    "rmsprop eps=0": lambda lr: rj.rmsprop(lr, eps=0.0),
    "rmsprop, eps outside": lambda lr: rj.rmsprop(lr, eps_in_sqrt=False),
    "centered, eps outside": lambda lr: rj.rmsprop(lr, centered=True, eps_in_sqrt=False),
    "adagrad eps=0": lambda lr: rj.adagrad(lr, eps=0.0, initial_accumulator_value=0.0),
    "torch rmsprop": lambda lr: rj.compat.torch_rmsprop(lr),
    "torch adagrad": lambda lr: rj.compat.torch_adagrad(lr),
    "factored": lambda lr: rj.factored_rmsprop(lr),
    "row-wise adagrad": lambda lr: rj.rowwise_adagrad(lr),
}


@pytest.mark.parametrize("name", list(FROZEN))
def test_a_gradient_through_steps_with_a_frozen_weight_matches_finite_differences(name):
    # A moment that is still 0 has an infinite derivative (sqrt at 0, rsqrt at 0), and
    # its rule selects a zero step there: JAX's derivative multiplied the zero cotangent
    # of the branch not taken by that infinity, and the gradient with respect to the
    # learning rate was NaN for every rule with eps outside the root or eps = 0, the
    # torch presets, factored and row-wise rules.
    make = FROZEN[name]
    with jax.enable_x64(True):
        lr, h = jnp.float64(0.05), 1e-6
        exact = jax.grad(_loss_with_a_frozen_weight)(lr, make)
        fd = (
            _loss_with_a_frozen_weight(lr + h, make) - _loss_with_a_frozen_weight(lr - h, make)
        ) / (2 * h)
        # (row-wise state is float32 whatever the parameters: the differences see its
        # rounding, 1e-4 of the gradient here)
        np.testing.assert_allclose(float(exact), float(fd), rtol=1e-3 if "row" in name else 1e-5)
    assert np.isfinite(float(jax.grad(_loss_with_a_frozen_weight)(0.05, make)))  # float32 too


def _loss_after_steps(lr, storage, steps=4):
    tx = rj.rmsprop(lr, storage=storage)
    params = {"w": jnp.linspace(0.5, 1.5, 5000)}
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda w: 2 * w, params)
        params, state = rj.update_and_apply(tx, grads, state, params)
    return jnp.sum(params["w"] ** 2)


def test_a_gradient_through_bfloat16_state_is_float32_states():
    # the unbiased rounding is integer arithmetic: without its own derivative (the
    # identity, as a conversion's) it cut the path through the moments, 1.8% off here
    gradient = jax.jit(jax.grad(_loss_after_steps), static_argnums=1)
    reference = gradient(0.01, None)
    through_bfloat16 = gradient(0.01, "bfloat16")
    np.testing.assert_allclose(through_bfloat16, reference, rtol=2e-4)


def test_float16_state_never_overflows_to_inf():
    params = {"w": jnp.zeros(3, jnp.float16)}
    g = {"w": jnp.array([300.0, -1000.0, 1.0], jnp.float16)}  # squares exceed 65504
    for tx in (rj.rmsprop(1e-3), rj.adagrad(1e-3)):
        state = tx.init(params)
        for _ in range(3):
            u, state = jax.jit(tx.update)(g, state)
            chex.assert_tree_all_finite((u, state))
        # the step still moves every coordinate, in the gradient's direction
        assert (np.sign(np.asarray(u["w"], np.float32)) == -np.sign([300.0, -1000.0, 1.0])).all()


# ------------------------------------------------ roots and reciprocals in plain arithmetic


def ulps_apart(a, b) -> np.ndarray:
    """How many float32 steps apart two arrays are, element by element (across zero too)."""
    ints = [np.asarray(x, np.float32).view(np.int32).astype(np.int64) for x in (a, b)]
    ordered = [np.where(i < 0, np.int64(-(2**31)) - i, i) for i in ints]
    return np.abs(ordered[0] - ordered[1])


def _normal_float32s(count: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    spread = np.exp2(rng.uniform(-126, 127.99, count))
    powers = np.exp2(np.arange(-126, 128, dtype=np.float64))
    return np.concatenate([spread, powers, powers * (1 - 2.0**-24)]).astype(np.float32)


@pytest.mark.parametrize(
    "name, exact, limit, ulps",
    [
        ("rsqrt_inline", lambda x: 1 / np.sqrt(x), 2.0**128, 1),
        ("sqrt_inline", np.sqrt, 2.0**128, 2),
        ("reciprocal_inline", lambda x: 1 / x, 2.0**125, 1),
    ],
)
def test_inline_roots_and_reciprocals_against_float64(name, exact, limit, ulps):
    # int8 steps compute these instead of rsqrt, sqrt and division, which XLA would not
    # recompute in each kernel that needs them (numerics.rsqrt_inline).
    from rmsjax._src import numerics

    function = jax.jit(getattr(numerics, name))
    x = _normal_float32s(200_000)
    x = x[x.astype(np.float64) < limit]
    want = exact(x.astype(np.float64)).astype(np.float32)
    got = np.asarray(function(x))
    normal = want >= np.float32(2.0**-126)
    assert np.all(ulps_apart(got[normal], want[normal]) <= ulps)
    # the special values as jax.lax.rsqrt, jnp.sqrt and 1 / x give them
    specials = np.float32([0.0, np.inf, np.nan])
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(
            np.asarray(function(specials)), exact(specials.astype(np.float64)).astype(np.float32)
        )
    if name == "rsqrt_inline":
        assert np.isnan(np.asarray(function(np.float32([-1.0, -np.inf])))).all()
    if name == "reciprocal_inline":
        assert np.asarray(function(np.float32([2.0**125, 3e38]))).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.1])
def test_inline_inverse_root_matches_the_plain_one(eps_in_sqrt, eps):
    from rmsjax._src import numerics

    value = np.concatenate([[0.0], _normal_float32s(50_000)]).astype(np.float32)
    value = value[value < 2.0**104]  # the moments' range (numerics.MomentRange)
    eps32 = np.float32(eps)

    def both(v):
        return [numerics.inverse_root(v, eps32, eps32, eps_in_sqrt, i) for i in (False, True)]

    plain, inline = (np.asarray(a) for a in jax.jit(both)(value))
    assert np.array_equal(np.isinf(plain), np.isinf(inline))
    finite = np.isfinite(plain) & (plain >= np.float32(2.0**-125))
    assert np.all(ulps_apart(inline[finite], plain[finite]) <= 4)


@pytest.mark.parametrize("scale", [1e-30, 1e-40, 1e-100])
def test_rowwise_adagrad_on_tiny_float64_gradients_steps_as_float32_adagrad_state(scale):
    # rowwise_adagrad keeps float32 row sums of float64 leaves: under float32's range
    # (1e-38) its sum was stored as 0, so every step repeated the first (-1, -1, ...;
    # the equations give -1/sqrt(t)); it now holds the sum as adagrad's float32 state
    # does (docs/numerics.md: the first step exact, smaller ones after it, down to 0)
    with jax.enable_x64(True):
        params = jnp.zeros((3, 4), jnp.float64)
        grads = jnp.full((3, 4), scale, jnp.float64).at[1].set(-scale)
        rowwise = rj.rowwise_adagrad(1.0, eps=0.0)
        elementwise = rj.adagrad(1.0, initial_accumulator_value=0.0, eps=0.0, storage="float32")
        s1, s2 = rowwise.init(params), elementwise.init(params)
        for t in range(1, 7):
            u1, s1 = jax.jit(rowwise.update)(grads, s1, params)
            u2, s2 = jax.jit(elementwise.update)(grads, s2, params)
            np.testing.assert_allclose(np.asarray(u1), np.asarray(u2), rtol=1e-6)
            want = -np.sign(np.asarray(grads)) / np.sqrt(t)
            if scale > 1e-38:
                np.testing.assert_allclose(np.asarray(u1), want, rtol=1e-6)
            else:  # held at the floor: the first step exact, the later ones smaller
                assert np.all(np.abs(np.asarray(u1)) <= np.abs(want) * (1 + 1e-6))
                assert t > 1 or np.allclose(np.asarray(u1), want, rtol=1e-6)
