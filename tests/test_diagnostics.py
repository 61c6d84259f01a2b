"""Tests of the effective step size diagnostics against float64 NumPy transcriptions:
the step per unit of gradient that the optimizer's next update takes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj


def params_tree():
    return {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "skip": None, "s": jnp.zeros(())}


def gradients(steps=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        out.append(
            jax.tree.map(
                lambda p: jnp.asarray(
                    rng.normal(size=jnp.shape(p)) * 10.0 ** rng.uniform(-3, 1, jnp.shape(p)),
                    jnp.float32,
                ),
                params_tree(),
            )
        )
    return out


def run(tx, grads):
    params = params_tree()
    state = tx.init(params)
    for g in grads:
        _, state = tx.update(g, state, params)
    return state


def np_second_moment(grads, key, decay=None, initial=0.0, centered=False):
    """RMSprop's average (decay given) or Adagrad's sum (decay None), float64."""
    v = np.full(np.shape(grads[0][key]), initial, np.float64)
    m = np.zeros_like(v)
    for g in grads:
        g = np.asarray(g[key], np.float64)
        if decay is None:
            v = v + g * g
        else:
            v = decay * v + (1 - decay) * g * g
            m = decay * m + (1 - decay) * g
    return np.maximum(v - m * m, 0) if centered else v


def test_rmsprop_step_sizes_match_numpy():
    # The next average keeps decay * nu of the present one: lr / sqrt(0.8 nu + eps).
    grads = gradients()
    tx = rj.rmsprop(3e-3, decay=0.8, eps=1e-6, momentum=0.9)
    state = run(tx, grads)
    sizes = rj.effective_step_sizes(tx, state, params_tree())
    assert sizes["skip"] is None
    for key in ["w", "b", "s"]:
        expected = 3e-3 / np.sqrt(0.8 * np_second_moment(grads, key, decay=0.8) + 1e-6)
        np.testing.assert_allclose(sizes[key], expected, rtol=2e-5)
        assert sizes[key].dtype == jnp.float32


def test_adagrad_step_sizes_match_numpy_with_eps_outside():
    grads = gradients(seed=1)
    tx = rj.chain(rj.scale_by_rss(0.5, eps=1e-4, eps_in_sqrt=False), rj.scale(-0.1))
    state = run(tx, grads)
    sizes = rj.effective_step_sizes(tx, state)  # shapes read from the state
    expected = 0.1 / (np.sqrt(np_second_moment(grads, "w", initial=0.5)) + 1e-4)
    np.testing.assert_allclose(sizes["w"], expected, rtol=2e-5)


def test_centered_rmsprop_uses_the_variance():
    # nu' = d nu + (1-d) g^2 and mu' = d mu + (1-d) g at g = 0: variance d nu - d^2 mu^2
    grads = gradients(seed=2)
    tx = rj.rmsprop(1e-2, centered=True)
    state = run(tx, grads)
    sizes = rj.effective_step_sizes(tx, state, params_tree())
    nu = np_second_moment(grads, "b", decay=0.9)
    mu = nu - np_second_moment(grads, "b", decay=0.9, centered=True)  # mu^2
    variance = 0.9 * nu - 0.81 * mu
    np.testing.assert_allclose(sizes["b"], 1e-2 / np.sqrt(variance + 1e-8), rtol=1e-4)


def test_knows_the_learning_rate_of_wrappers_schedules_and_injected_hyperparameters():
    # The same numbers whatever the wrapping: the learning rate is the optimizer's own.
    grads = gradients(seed=3)
    schedule = rj.schedules.exponential_decay(0.02, transition_steps=4, decay_rate=0.5)
    inner = rj.inject_hyperparams(rj.rmsprop)(learning_rate=schedule, eps=1e-5)
    tx = rj.apply_if_finite(
        rj.chain(
            rj.clip_by_global_norm(10.0),
            rj.masked(inner, lambda p: jax.tree.map(lambda _: True, p)),
        ),
        3,
    )
    state = run(tx, grads)
    sizes = rj.effective_step_sizes(tx, state, params_tree())
    clipped = []
    for g in grads:  # the NumPy reference sees the clipped gradients
        norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g)))
        factor = 1.0 if norm < 10.0 else 10.0 / norm
        clipped.append({k: factor * np.asarray(v, np.float64) for k, v in g.items()})
    lr_next = 0.02 * 0.5 ** (len(grads) / 4)  # the rate of the next step's count
    nu = np_second_moment(clipped, "w", decay=0.9)
    np.testing.assert_allclose(sizes["w"], lr_next / np.sqrt(0.9 * nu + 1e-5), rtol=1e-4)


def test_grouped_state_gives_the_parameters_structure():
    grads = gradients(seed=6)
    plain, grouped = rj.rmsprop(1e-3), rj.grouped(rj.rmsprop(1e-3))
    want = rj.effective_step_sizes(plain, run(plain, grads), params_tree())
    got = rj.effective_step_sizes(grouped, run(grouped, grads), params_tree())
    assert jax.tree.structure(got) == jax.tree.structure(want)
    chex.assert_trees_all_close(got, want, rtol=1e-6)
    # Without the parameters a grouped state cannot tell the tree: no guess, an error.
    with pytest.raises(ValueError, match=r"effective_step_sizes: pass params .* grouped state"):
        rj.effective_step_sizes(grouped, run(grouped, grads))
    with pytest.raises(ValueError, match=r"step_size_summary: pass params .* grouped state"):
        rj.step_size_summary(grouped, run(grouped, grads))


def test_a_masked_state_without_the_parameters_is_refused_not_half_read():
    # the leaves the mask left out came back as MaskedNode() instead of step sizes
    import optax

    params = {"b": jnp.zeros(3), "w": jnp.zeros((2, 3))}
    mask = {"b": False, "w": True}
    for tx in (rj.masked(rj.rmsprop(0.01), mask), optax.masked(rj.rmsprop(0.01), mask)):
        state = tx.init(params)
        for function in (rj.effective_step_sizes, rj.step_size_summary):
            with pytest.raises(ValueError, match=r": pass params .* its mask leaves out"):
                function(tx, state)
        # with them: a left-out leaf takes its gradient as it is, a step size of 1
        sizes = rj.effective_step_sizes(tx, state, params)
        np.testing.assert_array_equal(sizes["b"], np.ones(3, np.float32))
        np.testing.assert_allclose(sizes["w"], 0.01 / np.sqrt(1e-8), rtol=1e-6)


def test_summary_matches_numpy_and_is_jittable_without_retracing():
    grads = gradients(seed=4)
    tx = rj.rmsprop(1e-3)
    params = params_tree()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, g):
        _, state = tx.update(g, state, params)
        return state, rj.step_size_summary(tx, state, params)

    state = tx.init(params)
    for g in grads:
        state, summary = step(state, g)
    chex.clear_trace_counter()
    assert summary["skip"] is None
    for key in ["w", "b", "s"]:
        sizes = 1e-3 / np.sqrt(0.9 * np_second_moment(grads, key, decay=0.9) + 1e-8)
        leaf = summary[key]
        assert isinstance(leaf, rj.StepSizeSummary)
        np.testing.assert_allclose(leaf.min, sizes.min(), rtol=2e-5)
        np.testing.assert_allclose(leaf.max, sizes.max(), rtol=2e-5)
        np.testing.assert_allclose(leaf.mean, sizes.mean(), rtol=2e-5)
        np.testing.assert_allclose(leaf.geometric_mean, np.exp(np.log(sizes).mean()), rtol=2e-5)
        assert leaf.min.shape == () and leaf.min.dtype == jnp.float32


def test_summary_mean_of_step_sizes_near_float32s_maximum():
    # eps=0 and gradients near 1e-37: each step size is about 1e35 and their float32
    # sum over 4096 elements passes float32's maximum; the mean does not.
    tx = rj.rmsprop(0.1, eps=0.0)
    params = {"w": jnp.zeros((64, 64))}
    g = {"w": jnp.asarray(np.linspace(1.0, 3.0, 4096).reshape(64, 64) * 1e-37, jnp.float32)}
    _, state = tx.update(g, tx.init(params), params)
    sizes = np.asarray(rj.effective_step_sizes(tx, state, params)["w"], np.float64)
    assert np.sum(sizes) > np.finfo(np.float32).max
    summary = rj.step_size_summary(tx, state, params)["w"]
    np.testing.assert_allclose(float(summary.mean), sizes.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(summary.max), sizes.max(), rtol=1e-6)


def test_adagrad_step_sizes_only_shrink():
    tx = rj.adagrad(0.1)
    params = params_tree()
    state = tx.init(params)
    previous = rj.effective_step_sizes(tx, state, params)
    for g in gradients(seed=5):
        _, state = tx.update(g, state, params)
        sizes = rj.effective_step_sizes(tx, state, params)
        # The sum only grows, so no step size grows, and on average they shrink.
        assert np.all(np.asarray(sizes["w"]) <= np.asarray(previous["w"]))
        assert float(jnp.mean(sizes["w"])) < float(jnp.mean(previous["w"]))
        previous = sizes


def test_int8_factored_and_rowwise_states():
    big = {"w": jnp.zeros((64, 128))}
    rng = np.random.default_rng(0)
    seq = [{"w": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)} for _ in range(4)]
    sizes = {}
    for name, tx in [
        ("exact", rj.rmsprop(1e-3)),
        ("int8", rj.rmsprop(1e-3, storage="int8")),
        ("factored", rj.factored_rmsprop(1e-3)),
        ("rowwise", rj.rowwise_adagrad(1e-3)),
    ]:
        state = tx.init(big)
        for g in seq:
            _, state = tx.update(g, state, big)
        sizes[name] = rj.effective_step_sizes(tx, state, big)["w"]
        assert sizes[name].shape == (64, 128)
    # Each step rounds an int8 root to within one code step: 3.1% within 4x of its
    # block's largest, up to 12.5% further down (docs/memory.md), and four steps compound
    # that for the smallest elements. Measured: median 0.9%, 99th percentile 5.4%, the
    # largest 17.6%.
    error = np.abs(np.asarray(sizes["int8"]) / np.asarray(sizes["exact"]) - 1)
    assert np.median(error) < 0.02
    assert np.percentile(error, 99) < 0.07
    assert np.max(error) < 0.25
    # factored: the rank-one estimate, of the same size on average
    assert 0.5 < float(jnp.mean(sizes["factored"]) / jnp.mean(sizes["exact"])) < 2
    # row-wise Adagrad: one step size per row, lr / (sqrt(sum of row means) + eps)
    rows = sum(np.mean(np.asarray(g["w"], np.float64) ** 2, axis=-1) for g in seq)
    np.testing.assert_allclose(
        sizes["rowwise"],
        np.broadcast_to((1e-3 / (np.sqrt(rows) + 1e-10))[:, None], (64, 128)),
        rtol=1e-5,
    )


def test_a_sum_still_zero_reports_the_step_of_a_small_gradient():
    # with eps > 0 it was 0 (the step at g = 0 is 0, by optax's where), though any
    # gradient, however small, moves the weight by lr g / sqrt(eps): unused embedding
    # rows, torch_adagrad and rowwise_adagrad at their default initial value of 0
    params = jnp.zeros((3, 4))
    for tx, expected in [
        (rj.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-6), 0.1 / np.sqrt(1e-6)),
        (rj.rowwise_adagrad(0.1), 0.1 / 1e-10),
        (rj.compat.torch_adagrad(0.1), 0.1 / 1e-10),
        (rj.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0), 0.0),
    ]:
        state = tx.init(params)
        sizes = np.asarray(rj.effective_step_sizes(tx, state, params))
        np.testing.assert_allclose(sizes, expected, rtol=1e-6)
        if expected:  # the step of a small gradient, measured
            small = jnp.full((3, 4), 1e-16)
            update, _ = tx.update(small, state, params)
            np.testing.assert_allclose(np.abs(np.asarray(update)) / 1e-16, expected, rtol=1e-4)
        update, _ = tx.update(jnp.zeros((3, 4)), state, params)
        assert not np.any(np.asarray(update))  # the step itself is unchanged: 0


def test_summary_mean_stays_within_min_and_max():
    tx = rj.sgd(3e38)
    summary = rj.step_size_summary(tx, tx.init(jnp.zeros(3)), jnp.zeros(3))
    assert float(summary.min) <= float(summary.mean) <= float(summary.max)


def test_an_nnx_optimizer_s_state_and_parameters_are_measured():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rj.rmsprop(0.01), wrt=nnx.Param)
    sizes = rj.effective_step_sizes(optimizer.tx, optimizer.opt_state, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(np.asarray(sizes["kernel"]), 0.01 / np.sqrt(1e-8), rtol=1e-6)


def test_errors_say_what_to_pass():
    with pytest.raises(TypeError, match=r"rmsjax\.effective_step_sizes: tx must be"):
        rj.effective_step_sizes(rj.rmsprop(0.1).init(params_tree()), None)
    tx = rj.sgd(0.1)
    with pytest.raises(ValueError, match=r"rmsjax\.effective_step_sizes: pass params"):
        rj.effective_step_sizes(tx, tx.init(params_tree()))
    tx = rj.chain(rj.add_decayed_weights(0.1), rj.rmsprop(0.1))  # it reads the parameters
    with pytest.raises(ValueError, match=r"^rmsjax\.effective_step_sizes: pass params \("):
        rj.effective_step_sizes(tx, tx.init(params_tree()))


def test_step_sizes_around_accumulation_measure_the_next_call():
    # training.md: 0 on a micro-step that only accumulates; with every_k=1 the wrapped
    # optimizer's own; the inner optimizer on state.inner_state for the cycle's step
    params = {"w": jnp.ones(3)}
    inner = rj.rmsprop(0.01)
    every_call = rj.accumulate_gradients(inner, 1)
    want = rj.effective_step_sizes(inner, inner.init(params), params)
    got = rj.effective_step_sizes(every_call, every_call.init(params), params)
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_allclose(np.asarray(want["w"]), 0.01 / np.sqrt(1e-8), rtol=1e-6)
    tx = rj.chain(rj.clip_by_global_norm(1.0), rj.accumulate_gradients(inner, 2))
    state = tx.init(params)
    np.testing.assert_array_equal(rj.effective_step_sizes(tx, state, params)["w"], 0.0)
    inside = rj.effective_step_sizes(inner, state[1].inner_state, params)
    np.testing.assert_array_equal(inside["w"], want["w"])


def test_summaries_of_leaves_reduced_together_are_each_leaf_s_own():
    # leaves of one shape and dtype are stacked and reduced together (four reductions
    # per shape, not per leaf): each summary must still be its own leaf's
    rng = np.random.default_rng(0)
    params = {
        "same": [jnp.zeros((5, 7)) for _ in range(4)],
        "other": jnp.zeros(11),
        "half": [jnp.zeros((5, 7), jnp.bfloat16) for _ in range(2)],
        "none": None,
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    tx = rj.rmsprop(1e-2, momentum=0.5)
    _, state = tx.update(grads, tx.init(params), params)
    sizes = rj.effective_step_sizes(tx, state, params)
    summary = jax.jit(lambda s: rj.step_size_summary(tx, s, params))(state)
    assert summary["none"] is None
    for got, s in zip(
        jax.tree.leaves(summary, is_leaf=lambda x: isinstance(x, rj.StepSizeSummary)),
        jax.tree.leaves(sizes),
    ):
        s = np.asarray(s, np.float64)
        np.testing.assert_allclose(got.min, s.min(), rtol=1e-6)
        np.testing.assert_allclose(got.max, s.max(), rtol=1e-6)
        np.testing.assert_allclose(got.mean, s.mean(), rtol=1e-5)
        np.testing.assert_allclose(got.geometric_mean, np.exp(np.log(s).mean()), rtol=1e-5)


def test_the_mean_of_tiny_step_sizes_in_a_large_leaf_is_their_mean_not_their_min():
    # moments held above 2^100 give step sizes near 1e-33; scaled by a fixed 2^-20 for a
    # leaf of 2^20 elements they fell under float32's normal range and summed to 0
    n = 2**20
    params = {"w": jnp.zeros(n)}
    tx = rj.rmsprop(1e-3)
    grads = {"w": jnp.where(jnp.arange(n) % 2 == 0, 1e30, 3e30).astype(jnp.float32)}
    _, state = tx.update(grads, tx.init(params), params)
    sizes = np.asarray(rj.effective_step_sizes(tx, state, params)["w"], np.float64)
    summary = rj.step_size_summary(tx, state, params)["w"]
    np.testing.assert_allclose(float(summary.mean), sizes.mean(), rtol=1e-5)
    assert float(summary.mean) > 1.5 * float(summary.min)


def test_with_coupled_weight_decay_in_front_the_step_size_is_the_derivative_at_the_decay():
    # training.md: the rule after add_decayed_weights sees weight_decay * param at a zero
    # gradient, so the figure is the derivative there, not lr / sqrt(decay * nu + eps)
    lr, rho, eps, wd = 0.01, 0.9, 1e-3, 0.5
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)), jnp.float32)}
    tx = rj.chain(rj.add_decayed_weights(wd), rj.rmsprop(lr, decay=rho, eps=eps))
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    nu = np.asarray(state[1][0].nu["w"], np.float64)
    decayed = wd * np.asarray(params["w"], np.float64)
    kept = rho * nu + eps
    expected = lr * kept / (kept + (1 - rho) * decayed**2) ** 1.5
    sizes = np.asarray(rj.effective_step_sizes(tx, state, params)["w"], np.float64)
    np.testing.assert_allclose(sizes, expected, rtol=1e-5)
    assert (sizes < lr / np.sqrt(kept)).all()
