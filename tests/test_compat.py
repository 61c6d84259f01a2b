"""rmsjax.compat presets against the libraries they reproduce.

Every preset runs 200 steps on a mixed pytree (gradients spanning 1e-4..10 in
magnitude, the first and the 101st step all zero) and is compared, step by step, with:

(a) optax, live: a chain of optax's own parts with the peer's arithmetic;
(b) torch.optim and Keras 3 trajectories stored in tests/fixtures by
    tests/fixtures/generate_peer_trajectories.py;
(c) torch and Keras themselves, when they are importable;
(d) float64 NumPy transcriptions of the peers' update equations, written below from
    the peers' sources (for TF1, its kernels in training_ops.cc). The torch and Keras
    transcriptions are themselves checked against the stored trajectories.

Tolerance: float32 trajectories agree with rtol=1e-5; parameters that cross zero are
compared with atol=1e-6 (1e-6 of the parameters' scale, which is about 1).
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rmsjax as rj
from rmsjax import compat
from rmsjax._src import fusion
from tests.fixtures import generate_peer_trajectories as peers

RTOL = 1e-5
ATOL = 1e-6
PEER_PRESETS = ("torch_rmsprop", "torch_adagrad", "keras_rmsprop", "keras_adagrad")

# ----------------------------------------------------------------------------- problem


@functools.cache
def stored() -> dict:
    with np.load(peers.FIXTURE, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    return arrays


def tree_of(flat) -> dict:
    """The test pytree of a flat vector: nested dicts, a scalar and a None leaf."""
    bias, kernel, embed, scale = peers.split(flat)
    return {
        "dense": {"bias": bias, "kernel": kernel},
        "embed": embed,
        "frozen": None,
        "scale": scale,
    }


def flat_of(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def schedule_args(spec) -> dict | None:
    return spec["exponential_decay"] if isinstance(spec, dict) else None


def jax_rate(spec):
    """A learning-rate argument as rmsjax takes it: a float or a schedule of the count."""
    args = schedule_args(spec)
    if args is None:
        return spec
    return lambda count: args["init_value"] * args["decay_rate"] ** (count / args["decay_steps"])


def numpy_rate(spec):
    """The same, as a function of the 0-based step for the float64 references."""
    args = schedule_args(spec)
    if args is None:
        return lambda t: spec
    return lambda t: args["init_value"] * args["decay_rate"] ** (t / args["decay_steps"])


def build(preset: str, kwargs: dict) -> rj.GradientTransformation:
    return getattr(compat, preset)(**{k: jax_rate(v) for k, v in kwargs.items()})


def trajectory(tx, params0: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """The flat parameters after each step of ``tx`` (jitted, one scan over the steps)."""

    @jax.jit
    def run(params, grads):
        def step(carry, g):
            params, state = carry
            updates, state = tx.update(tree_of(g), state, params)
            params = rj.apply_updates(params, updates)
            return (params, state), flat_of(params)

        return jax.lax.scan(step, (params, tx.init(params)), grads)[1]

    params = jax.tree.map(jnp.asarray, tree_of(params0))
    return np.asarray(run(params, jnp.asarray(grads, jnp.float32)))


def assert_trajectories_close(actual, desired, rtol=RTOL, atol=ATOL):
    """Per step and element; names the first step that differs."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    assert np.isfinite(desired).all()
    bad = ~(np.abs(actual - desired) <= atol + rtol * np.abs(desired))
    if bad.any():
        step = int(np.argwhere(bad)[0][0])
        np.testing.assert_allclose(
            actual[step], desired[step], rtol=rtol, atol=atol, err_msg=f"first at step {step}"
        )


# ------------------------------------------------- (d) float64 transcriptions of peers


def reference_torch_rmsprop(
    params0, grads, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
    centered=False, maximize=False,
):  # fmt: skip
    """torch/optim/rmsprop.py, _single_tensor_rmsprop, in float64."""
    rate = numpy_rate(lr)
    p = np.array(params0, np.float64)
    square_avg, grad_avg, buf = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64)):
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + weight_decay * p
        square_avg = alpha * square_avg + (1 - alpha) * g * g
        if centered:
            grad_avg = grad_avg + (g - grad_avg) * (1 - alpha)
            avg = np.sqrt(square_avg - grad_avg * grad_avg) + eps
        else:
            avg = np.sqrt(square_avg) + eps
        if momentum > 0:
            buf = momentum * buf + g / avg
            p = p - rate(t) * buf
        else:
            p = p - rate(t) * g / avg
        out.append(p)
    return np.array(out)


def reference_torch_adagrad(
    params0, grads, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
    eps=1e-10, maximize=False,
):  # fmt: skip
    """torch/optim/adagrad.py, _single_tensor_adagrad, in float64."""
    rate = numpy_rate(lr)
    p = np.array(params0, np.float64)
    state_sum = np.full_like(p, initial_accumulator_value)
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64)):
        step = t + 1
        g = -g if maximize else g
        if weight_decay != 0:
            g = g + weight_decay * p
        clr = rate(t) / (1 + (step - 1) * lr_decay)
        state_sum = state_sum + g * g
        p = p - clr * g / (np.sqrt(state_sum) + eps)
        out.append(p)
    return np.array(out)


def reference_keras_rmsprop(
    params0, grads, learning_rate=1e-3, rho=0.9, momentum=0.0, epsilon=1e-7,
    centered=False, weight_decay=None,
):  # fmt: skip
    """keras/src/optimizers/rmsprop.py update_step after base_optimizer's
    _apply_weight_decay, in float64."""
    rate = numpy_rate(learning_rate)
    p = np.array(params0, np.float64)
    velocity, average_grad, buf = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64)):
        lr = rate(t)
        if weight_decay is not None:
            p = p - p * weight_decay * lr
        velocity = rho * velocity + (1 - rho) * g * g
        if centered:
            average_grad = rho * average_grad + (1 - rho) * g
            denominator = velocity - average_grad**2 + epsilon
        else:
            denominator = velocity + epsilon
        increment = lr * g / np.sqrt(denominator)
        if momentum > 0:
            buf = momentum * buf + increment
            p = p - buf
        else:
            p = p - increment
        out.append(p)
    return np.array(out)


def reference_keras_adagrad(
    params0, grads, learning_rate=1e-3, initial_accumulator_value=0.1, epsilon=1e-7,
    weight_decay=None,
):  # fmt: skip
    """keras/src/optimizers/adagrad.py update_step after _apply_weight_decay, float64."""
    rate = numpy_rate(learning_rate)
    p = np.array(params0, np.float64)
    accumulator = np.full_like(p, initial_accumulator_value)
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64)):
        lr = rate(t)
        if weight_decay is not None:
            p = p - p * weight_decay * lr
        accumulator = accumulator + g * g
        p = p - lr * g / np.sqrt(accumulator + epsilon)
        out.append(p)
    return np.array(out)


def reference_tf1_rmsprop(
    params0, grads, learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False
):
    """TF1 RMSPropOptimizer: slots rms=1, mg=0, momentum=0 (rmsprop.py _create_slots),
    then the ApplyRMSProp / ApplyCenteredRMSProp kernels of training_ops.cc:
    ms += (g^2 - ms) (1 - rho); mg += (g - mg) (1 - rho);
    mom = mom * momentum + lr * g / sqrt(ms [- mg^2] + epsilon); var -= mom."""
    rate = numpy_rate(learning_rate)
    var = np.array(params0, np.float64)
    ms, mg, mom = np.ones_like(var), np.zeros_like(var), np.zeros_like(var)
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64)):
        ms = ms + (g * g - ms) * (1 - decay)
        if centered:
            mg = mg + (g - mg) * (1 - decay)
            denominator = ms - mg * mg + epsilon
        else:
            denominator = ms + epsilon
        mom = mom * momentum + rate(t) * g / np.sqrt(denominator)
        var = var - mom
        out.append(var)
    return np.array(out)


def reference_tf1_adagrad(params0, grads, learning_rate, initial_accumulator_value=0.1):
    """TF1 AdagradOptimizer: accum slot = initial_accumulator_value, then ApplyAdagrad:
    accum += g^2; var -= lr * g * rsqrt(accum)."""
    rate = numpy_rate(learning_rate)
    var = np.array(params0, np.float64)
    accum = np.full_like(var, initial_accumulator_value)
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64)):
        accum = accum + g * g
        var = var - rate(t) * g / np.sqrt(accum)
        out.append(var)
    return np.array(out)


REFERENCES = {
    "torch_rmsprop": reference_torch_rmsprop,
    "torch_adagrad": reference_torch_adagrad,
    "keras_rmsprop": reference_keras_rmsprop,
    "keras_adagrad": reference_keras_adagrad,
    "tf1_rmsprop": reference_tf1_rmsprop,
    "tf1_adagrad": reference_tf1_adagrad,
}

# ------------------------------------------------------------------ the stored problem


def test_stored_problem_is_the_generators_and_spans_the_range():
    data = stored()
    meta = data["meta"]
    params0, grads = peers.make_problem(meta["seed"])
    np.testing.assert_array_equal(data["params0"], params0)
    np.testing.assert_array_equal(data["grads"], grads)
    assert grads.shape == (peers.STEPS, params0.size) == (200, 18)
    assert meta["leaves"] == [[path, list(shape)] for path, shape in peers.LEAVES]
    assert meta["cases"] == {c: {"preset": p, "kwargs": k} for c, (p, k) in peers.CASES.items()}
    assert {meta["cases"][c]["preset"] for c in meta["cases"]} == set(PEER_PRESETS)
    for step in meta["zero_steps"]:
        assert not grads[step].any()
    nonzero = np.abs(grads[grads != 0])
    assert math.isclose(nonzero.min(), 1e-4, rel_tol=1e-6)
    assert math.isclose(nonzero.max(), 10.0, rel_tol=1e-6)
    assert os.path.getsize(peers.FIXTURE) < 400_000
    assert meta["versions"]["torch"].startswith("2.13.0")
    assert meta["versions"]["keras_backend"] == "jax"


# --------------------------------------------------- (b) the stored peer trajectories


@functools.cache
def preset_trajectory(case: str) -> np.ndarray:
    """The preset's trajectory for a stored case (computed once, compared thrice)."""
    data = stored()
    preset, kwargs = peers.CASES[case]
    return trajectory(build(preset, kwargs), data["params0"], data["grads"])


@pytest.mark.parametrize("case", sorted(peers.CASES))
def test_preset_matches_stored_peer_trajectory(case):
    assert_trajectories_close(preset_trajectory(case), stored()[case])


@pytest.mark.parametrize("case", sorted(peers.CASES))
def test_all_zero_first_step_leaves_parameters_unchanged(case):
    """Step 0's gradient is zero everywhere (the state at its initial value, torch's
    Adagrad sum at 0): without weight decay neither peer nor preset moves, exactly."""
    data = stored()
    preset, kwargs = peers.CASES[case]
    assert not data["grads"][0].any()
    if kwargs.get("weight_decay"):
        assert np.all(preset_trajectory(case)[0] != data["params0"])
        return
    np.testing.assert_array_equal(data[case][0], data["params0"])
    np.testing.assert_array_equal(preset_trajectory(case)[0], data["params0"])


@pytest.mark.parametrize("case", sorted(peers.CASES))
def test_float64_transcription_matches_stored_peer_trajectory(case):
    """Checks the transcriptions used below (and for TF1's siblings) against the peers."""
    data = stored()
    preset, kwargs = peers.CASES[case]
    expected = REFERENCES[preset](data["params0"], data["grads"], **kwargs)
    assert_trajectories_close(data[case], expected)


# --------------------------------------------------------------- (d) TF1 and the rest

TF1_CASES = {
    "tf1_rmsprop.plain": ("tf1_rmsprop", {"learning_rate": 1e-2}),
    "tf1_rmsprop.centered_momentum": (
        "tf1_rmsprop",
        {"learning_rate": 3e-3, "decay": 0.95, "momentum": 0.9, "epsilon": 1e-6, "centered": True},
    ),
    "tf1_rmsprop.schedule_momentum": (
        "tf1_rmsprop",
        {"learning_rate": peers._schedule(1e-2), "momentum": 0.5, "epsilon": 1e-4},
    ),
    "tf1_adagrad.plain": ("tf1_adagrad", {"learning_rate": 0.1}),
    "tf1_adagrad.tiny_start_schedule": (
        "tf1_adagrad",
        {"learning_rate": peers._schedule(0.05), "initial_accumulator_value": 1e-6},
    ),
}


@pytest.mark.parametrize("case", sorted(TF1_CASES))
def test_tf1_preset_matches_kernel_equations(case):
    data = stored()
    preset, kwargs = TF1_CASES[case]
    actual = trajectory(build(preset, kwargs), data["params0"], data["grads"])
    expected = REFERENCES[preset](data["params0"], data["grads"], **kwargs)
    assert_trajectories_close(actual, expected)


# ------------------------------------------------------------------- (a) optax, live


def optax_schedule(spec):
    return jax_rate(spec)


def optax_torch_rmsprop(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                        centered=False, maximize=False):  # fmt: skip
    second_moment = optax.scale_by_stddev if centered else optax.scale_by_rms
    return optax.chain(
        optax.scale(-1.0) if maximize else optax.identity(),
        optax.add_decayed_weights(weight_decay),
        second_moment(decay=alpha, eps=eps, eps_in_sqrt=False),
        optax.trace(decay=momentum) if momentum else optax.identity(),
        optax.scale_by_learning_rate(optax_schedule(lr)),
    )


def optax_torch_adagrad(lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                        eps=1e-10, maximize=False):  # fmt: skip
    # optax adds eps inside the root only: the comparison runs with eps=0.
    assert eps == 0
    base = optax_schedule(lr)

    def rate(count):
        return (base(count) if callable(base) else base) / (1 + count * lr_decay)

    return optax.chain(
        optax.scale(-1.0) if maximize else optax.identity(),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_rss(initial_accumulator_value, eps=0.0),
        optax.scale_by_learning_rate(rate),
    )


def optax_keras_rmsprop(learning_rate=1e-3, rho=0.9, momentum=0.0, epsilon=1e-7,
                        centered=False, weight_decay=None):  # fmt: skip
    rate = optax_schedule(learning_rate)
    second_moment = optax.scale_by_stddev if centered else optax.scale_by_rms
    decay = optax.identity()
    if weight_decay is not None:
        decay = optax.add_decayed_weights(
            lambda count: -(rate(count) if callable(rate) else rate) * weight_decay
        )
    return optax.chain(
        second_moment(decay=rho, eps=epsilon),
        optax.scale_by_learning_rate(rate),
        optax.trace(decay=momentum) if momentum else optax.identity(),
        decay,
    )


def optax_keras_adagrad(learning_rate=1e-3, initial_accumulator_value=0.1, epsilon=1e-7,
                        weight_decay=None):  # fmt: skip
    rate = optax_schedule(learning_rate)
    decay = optax.identity()
    if weight_decay is not None:
        decay = optax.add_decayed_weights(
            lambda count: -(rate(count) if callable(rate) else rate) * weight_decay
        )
    return optax.chain(optax.adagrad(rate, initial_accumulator_value, epsilon), decay)


def optax_tf1_rmsprop(learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False):
    return optax.rmsprop(
        optax_schedule(learning_rate), decay, epsilon, initial_scale=1.0, centered=centered,
        momentum=momentum or None,
    )  # fmt: skip


def optax_tf1_adagrad(learning_rate, initial_accumulator_value=0.1):
    return optax.adagrad(optax_schedule(learning_rate), initial_accumulator_value, eps=0.0)


OPTAX = {
    "torch_rmsprop": optax_torch_rmsprop,
    "torch_adagrad": optax_torch_adagrad,
    "keras_rmsprop": optax_keras_rmsprop,
    "keras_adagrad": optax_keras_adagrad,
    "tf1_rmsprop": optax_tf1_rmsprop,
    "tf1_adagrad": optax_tf1_adagrad,
}


def optax_cases() -> dict:
    cases = {**peers.CASES, **TF1_CASES}
    # torch's eps goes outside the root, where optax has no place for it.
    return {
        name: (preset, {**kwargs, "eps": 0.0} if preset == "torch_adagrad" else kwargs)
        for name, (preset, kwargs) in cases.items()
    }


@pytest.mark.parametrize("case", sorted(optax_cases()))
def test_preset_matches_optax_chain(case):
    data = stored()
    preset, kwargs = optax_cases()[case]
    if kwargs == peers.CASES.get(case, (None, None))[1]:
        actual = preset_trajectory(case)
    else:
        actual = trajectory(build(preset, kwargs), data["params0"], data["grads"])
    expected = trajectory(OPTAX[preset](**kwargs), data["params0"], data["grads"])
    assert_trajectories_close(actual, expected)


# ------------------------------------------------------- (c) torch and Keras, live


def live_peer_available(preset: str) -> None:
    if preset.startswith("torch"):
        pytest.importorskip("torch")
    else:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        keras = pytest.importorskip("keras")
        if keras.backend.backend() != "jax":
            pytest.skip("Keras was imported with a backend other than jax")


@pytest.mark.parametrize("case", sorted(peers.CASES))
def test_preset_matches_live_peer(case):
    preset, kwargs = peers.CASES[case]
    live_peer_available(preset)
    data = stored()
    live = peers.run_peer(case, data["params0"], data["grads"])
    assert_trajectories_close(preset_trajectory(case), live)
    assert_trajectories_close(live, data[case])  # the fixture is still what the peer does


@pytest.mark.parametrize(
    "preset,peer",
    [
        ("torch_rmsprop", "torch steps a complex parameter as two real ones"),
        ("torch_adagrad", "torch steps a complex parameter as two real ones"),
        ("keras_rmsprop", "Keras squares a complex gradient"),
        ("keras_adagrad", "Keras squares a complex gradient"),
        ("tf1_rmsprop", "TF1 squares a complex gradient"),
        ("tf1_adagrad", "TF1 squares a complex gradient"),
    ],
)
def test_presets_refuse_complex_leaves_that_their_peer_steps_otherwise(preset, peer):
    # they computed optax's |g|^2 moment: 16-45% off torch's steps over 30 steps
    tx = getattr(compat, preset)(0.1)
    params = {"w": jnp.ones((3, 4), jnp.complex64)}
    with pytest.raises(TypeError, match=rf"^rmsjax\.compat\.{preset}\.init: leaf .*{peer}"):
        tx.init(params)
    with pytest.raises(TypeError, match=rf"^rmsjax\.compat\.{preset}\.update: leaf .*{peer}"):
        tx.update(params, tx.init({"w": jnp.ones((3, 4))}), params)
    with pytest.raises(TypeError, match=peer):  # whatever the storage
        getattr(compat, preset)(0.1, storage="int8").init({"w": jnp.ones((64, 64), jnp.complex64)})


@pytest.mark.parametrize("preset", ["torch_rmsprop", "torch_adagrad"])
def test_a_complex_parameter_stacked_as_real_steps_as_torch_steps_it(preset):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    z0 = (rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))).astype(np.complex64)
    grads = [
        (rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4))).astype(np.complex64)
        for _ in range(20)
    ]
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    if preset == "torch_rmsprop":
        kwargs.update(momentum=0.9, centered=True)
    theirs = torch.tensor(z0, requires_grad=True)
    optimizer = {"torch_rmsprop": torch.optim.RMSprop, "torch_adagrad": torch.optim.Adagrad}
    opt = optimizer[preset]([theirs], **kwargs)
    tx = getattr(compat, preset)(**kwargs)
    ours = jnp.stack([z0.real, z0.imag], -1)
    state = tx.init(ours)
    for g in grads:
        theirs.grad = torch.tensor(g)
        opt.step()
        ours, state = rj.update_and_apply(tx, jnp.stack([g.real, g.imag], -1), state, ours)
        expected = torch.view_as_real(theirs.detach()).numpy()
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-5, atol=2e-6)


def test_keras_schedule_object_works_as_a_learning_rate():
    """A Keras LearningRateSchedule (on the JAX backend) is a function of the count."""
    live_peer_available("keras_rmsprop")
    import keras

    data = stored()
    kwargs = {"learning_rate": peers._schedule(1e-2), "momentum": 0.9, "weight_decay": 0.2}
    args = kwargs["learning_rate"]["exponential_decay"]
    schedule = keras.optimizers.schedules.ExponentialDecay(
        args["init_value"], args["decay_steps"], args["decay_rate"]
    )
    tx = compat.keras_rmsprop(**{**kwargs, "learning_rate": schedule})
    actual = trajectory(tx, data["params0"], data["grads"])
    assert_trajectories_close(actual, data["keras_rmsprop.schedule_momentum_decay"])


EXCLUDED = ("dense/bias", "scale")  # leaves left out of the weight decay
DECAY_MASK = {
    "dense": {"bias": False, "kernel": True},
    "embed": True,
    "frozen": None,
    "scale": False,
}
MASKED_KWARGS = {"learning_rate": 1e-2, "momentum": 0.9}


@functools.cache
def masked_decay_trajectory() -> np.ndarray:
    """Keras' exclude_from_weight_decay as docs/porting.md writes it: the preset without
    weight decay, then decoupled_weight_decay masked to the decayed leaves."""
    data = stored()
    tx = rj.chain(
        compat.keras_rmsprop(**MASKED_KWARGS),
        rj.masked(compat.decoupled_weight_decay(0.2, MASKED_KWARGS["learning_rate"]), DECAY_MASK),
    )
    return trajectory(tx, data["params0"], data["grads"])


def test_keras_exclude_from_weight_decay_is_a_masked_decoupled_decay():
    data = stored()
    params0, grads = data["params0"], data["grads"]
    selected = np.concatenate(
        [np.full(math.prod(shape), path not in EXCLUDED) for path, shape in peers.LEAVES]
    )
    # Every rule is elementwise: the expected trajectory takes each element from the
    # run with weight decay or from the run without it.
    expected = np.where(
        selected,
        reference_keras_rmsprop(params0, grads, **MASKED_KWARGS, weight_decay=0.2),
        reference_keras_rmsprop(params0, grads, **MASKED_KWARGS),
    )
    assert_trajectories_close(masked_decay_trajectory(), expected)


def test_keras_exclude_from_weight_decay_live():
    live_peer_available("keras_rmsprop")
    import keras

    data = stored()
    variables = [
        keras.Variable(leaf, name=path.replace("/", "_"))
        for (path, _), leaf in zip(peers.LEAVES, peers.split(data["params0"]), strict=True)
    ]
    optimizer = keras.optimizers.RMSprop(**MASKED_KWARGS, weight_decay=0.2)
    optimizer.exclude_from_weight_decay(var_names=[p.replace("/", "_") for p in EXCLUDED])
    live = []
    for g in data["grads"]:
        optimizer.apply(peers.split(g), variables)
        live.append(np.concatenate([np.asarray(v.value).reshape(-1) for v in variables]))
    assert_trajectories_close(masked_decay_trajectory(), np.array(live))


# ------------------------------------------------------ each preset is a chain of parts


def test_presets_are_chains_of_the_core_parts():
    schedule = jax_rate(peers._schedule(1e-2))
    pairs = [
        (
            compat.torch_rmsprop(schedule, 0.9, 1e-6, 0.1, 0.9, True, maximize=True),
            rj.chain(
                rj.scale(-1.0),
                rj.add_decayed_weights(0.1),
                rj.scale_by_rms(0.9, 1e-6, eps_in_sqrt=False, centered=True),
                rj.trace(0.9),
                rj.scale_by_learning_rate(schedule),
            ),
        ),
        (
            compat.torch_adagrad(0.1, 0.05, 0.1, 0.2, 1e-6, maximize=True),
            rj.chain(
                rj.scale(-1.0),
                rj.add_decayed_weights(0.1),
                rj.scale_by_rss(0.2, 1e-6, eps_in_sqrt=False),
                rj.scale_by_learning_rate(compat.inverse_time_decay(0.1, 0.05)),
            ),
        ),
        (
            compat.keras_rmsprop(schedule, 0.8, 0.5, 1e-5, True),
            rj.chain(
                rj.scale_by_rms(0.8, 1e-5, centered=True),
                rj.scale_by_learning_rate(schedule),
                rj.trace(0.5),
            ),
        ),
        (
            compat.tf1_rmsprop(0.01, 0.9, 0.5, 1e-6),
            rj.rmsprop(0.01, 0.9, 1e-6, initial_scale=1.0, momentum=0.5),
        ),
        (compat.tf1_adagrad(0.1, 0.5), rj.adagrad(0.1, 0.5, eps=0.0)),
        (compat.keras_adagrad(0.1, 0.2, 1e-5), rj.adagrad(0.1, 0.2, 1e-5)),
        (
            compat.keras_adagrad(schedule, 0.2, 1e-5, weight_decay=0.1),
            rj.chain(
                rj.scale_by_rss(0.2, 1e-5),
                rj.scale_by_learning_rate(schedule),
                compat.decoupled_weight_decay(0.1, schedule),
            ),
        ),
    ]
    data = stored()
    for preset, chain in pairs:
        # Three steps without jit (op by op, no compilation): bit-identical numbers.
        runs = []
        for tx in (preset, chain):
            params = jax.tree.map(jnp.asarray, tree_of(data["params0"]))
            state = tx.init(params)
            for g in data["grads"][1:4]:
                updates, state = tx.update(tree_of(jnp.asarray(g)), state, params)
                params = rj.apply_updates(params, updates)
            runs.append(params)
        chex.assert_trees_all_equal(*runs)


def test_state_tuple_has_one_place_per_part_whatever_the_arguments():
    # the same length, and a part that is off keeps an EmptyState; a part that is on
    # holds its own state (docs/porting.md: a momentum=0 checkpoint does not fit momentum=0.9)
    params = tree_of(stored()["params0"])
    plain = compat.torch_rmsprop().init(params)
    full = compat.torch_rmsprop(weight_decay=0.1, maximize=True, momentum=0.9).init(params)
    assert len(plain) == len(full) == 5
    assert isinstance(plain[2], rj.ScaleByRmsState) and isinstance(full[2], rj.ScaleByRmsState)
    assert isinstance(plain[3], rj.EmptyState) and isinstance(full[3], rj.TraceState)
    keras_plain = compat.keras_adagrad().init(params)
    keras_decay = compat.keras_adagrad(weight_decay=0.1).init(params)
    assert isinstance(keras_plain[2], rj.EmptyState)
    assert isinstance(keras_decay[2], compat.DecoupledWeightDecayState)
    assert len(compat.torch_adagrad(lr_decay=0.1).init(params)) == 4


ALL_PARTS_ON = {
    "torch_rmsprop": {"weight_decay": 0.1, "momentum": 0.9, "centered": True, "maximize": True},
    "torch_adagrad": {"lr_decay": 0.1, "weight_decay": 0.1, "maximize": True},
    "keras_rmsprop": {"momentum": 0.9, "centered": True, "weight_decay": 0.1},
    "keras_adagrad": {"weight_decay": 0.1},
    "tf1_rmsprop": {"learning_rate": 0.1, "momentum": 0.9, "centered": True},
    "tf1_adagrad": {"learning_rate": 0.1},
}


@pytest.mark.parametrize("preset", sorted(ALL_PARTS_ON))
def test_presets_fuse_into_one_leaf_loop(preset):
    for kwargs in (ALL_PARTS_ON[preset], {"learning_rate": 0.1} if "tf1" in preset else {}):
        assert fusion.leaf_rule_of(getattr(compat, preset)(**kwargs)) is not None


# ----------------------------------------------- the suite tells conventions apart


def test_conventions_differ_by_far_more_than_the_tolerance():
    """The comparisons above can fail: swapping one convention moves the trajectory."""
    data = stored()
    params0, grads = data["params0"], data["grads"]
    schedule = jax_rate(peers._schedule(1e-2))
    torch_order = trajectory(compat.torch_rmsprop(schedule, 0.9, momentum=0.9), params0, grads)
    lr_inside = rj.chain(
        rj.scale_by_rms(0.9, 1e-8, eps_in_sqrt=False), rj.scale_by_learning_rate(schedule),
        rj.trace(0.9),
    )  # fmt: skip
    eps_inside = trajectory(compat.keras_rmsprop(1e-2, 0.9, epsilon=1e-8), params0, grads)
    eps_outside = trajectory(compat.torch_rmsprop(1e-2, 0.9, eps=1e-8), params0, grads)
    for a, b in [
        (torch_order, trajectory(lr_inside, params0, grads)),
        (eps_inside, eps_outside),
        (trajectory(compat.tf1_rmsprop(1e-2), params0, grads), eps_inside),
        (trajectory(compat.torch_adagrad(0.1), params0, grads),
         trajectory(compat.keras_adagrad(0.1, 0.0), params0, grads)),
    ]:  # fmt: skip
        assert np.max(np.abs(a - b) / (ATOL + RTOL * np.abs(b))) > 100


# ---------------------------------------------------- jit, no jit, update_and_apply


class TestVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_torch_rmsprop_with_and_without_jit(self):
        data = stored()
        kwargs = {"lr": 3e-3, "alpha": 0.9, "momentum": 0.9, "centered": True}
        tx = compat.torch_rmsprop(**kwargs)
        update = self.variant(tx.update)
        params = jax.tree.map(jnp.asarray, tree_of(data["params0"]))
        state = tx.init(params)
        for g in data["grads"][:5]:
            updates, state = update(tree_of(jnp.asarray(g)), state, params)
            params = rj.apply_updates(params, updates)
        chex.assert_trees_all_close(
            flat_of(params), data["torch_rmsprop.centered_momentum"][4], rtol=RTOL, atol=ATOL
        )


@pytest.mark.parametrize(
    "case", ["keras_rmsprop.schedule_momentum_decay", "torch_adagrad.schedule_lr_decay"]
)
def test_update_and_apply_matches_update(case):
    data = stored()
    tx = build(*peers.CASES[case])
    params = jax.tree.map(jnp.asarray, tree_of(data["params0"]))
    state_a = state_b = tx.init(params)
    params_a = params_b = params
    fused = jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))

    @jax.jit
    def unfused(g, s, p):
        updates, s = tx.update(g, s, p)
        return rj.apply_updates(p, updates), s

    for g in data["grads"][:5]:
        g = tree_of(jnp.asarray(g))
        params_a, state_a = fused(g, state_a, params_a)
        params_b, state_b = unfused(g, state_b, params_b)
    chex.assert_trees_all_equal(params_a, params_b)
    chex.assert_trees_all_equal(state_a, state_b)


@pytest.mark.parametrize("preset", sorted(ALL_PARTS_ON))
def test_bfloat16_parameters_keep_their_dtype_and_follow_the_reference(preset):
    """Half-precision leaves: the step computes in float32 and every parameter and state
    array stays bfloat16. The first step's updates (small next to the parameters, so
    compared before they are rounded into them) match the float64 transcription to
    bfloat16's precision (8 significant bits)."""
    data = stored()
    kwargs = ALL_PARTS_ON[preset]
    tx = getattr(compat, preset)(**kwargs)
    params0 = data["params0"].astype(jnp.bfloat16)
    grads = data["grads"][1:4].astype(jnp.bfloat16)
    params = jax.tree.map(jnp.asarray, tree_of(params0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    emitted = []
    for g in grads:
        updates, state = update(tree_of(jnp.asarray(g)), state, params)
        params = rj.apply_updates(params, updates)
        emitted.append(np.asarray(flat_of(updates), np.float64))
    for leaf in jax.tree.leaves((params, state)):
        assert leaf.dtype in (jnp.bfloat16, jnp.int32), leaf.dtype
    start = params0.astype(np.float64)
    expected = REFERENCES[preset](start, grads[:1].astype(np.float64), **kwargs)[0] - start
    np.testing.assert_allclose(emitted[0], expected, rtol=2e-2, atol=1e-6)


def test_weight_decay_needs_params():
    tx = compat.keras_rmsprop(weight_decay=0.1)
    params = jnp.ones(3)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(jnp.ones(3), tx.init(params))


# ------------------------------------------- traced hyperparameters, random settings


HYPER = {
    "torch_rmsprop": dict(
        lr=st.floats(1e-4, 0.1), alpha=st.floats(0.0, 0.999), eps=st.floats(1e-8, 1e-2),
        weight_decay=st.floats(0.0, 0.5), momentum=st.floats(0.0, 0.95),
    ),
    "torch_adagrad": dict(
        lr=st.floats(1e-4, 0.5), lr_decay=st.floats(0.0, 0.5), weight_decay=st.floats(0.0, 0.5),
        initial_accumulator_value=st.floats(0.0, 1.0), eps=st.floats(1e-10, 1e-2),
    ),
    "keras_rmsprop": dict(
        learning_rate=st.floats(1e-4, 0.1), rho=st.floats(0.0, 0.999),
        momentum=st.floats(0.0, 0.95), epsilon=st.floats(1e-8, 1e-2),
        weight_decay=st.floats(0.0, 0.5),
    ),
    "keras_adagrad": dict(
        learning_rate=st.floats(1e-4, 0.5), initial_accumulator_value=st.floats(0.0, 1.0),
        epsilon=st.floats(1e-8, 1e-2), weight_decay=st.floats(0.0, 0.5),
    ),
    "tf1_rmsprop": dict(
        learning_rate=st.floats(1e-4, 0.1), decay=st.floats(0.0, 0.999),
        momentum=st.floats(0.0, 0.95), epsilon=st.floats(1e-10, 1e-2),
    ),
    "tf1_adagrad": dict(
        learning_rate=st.floats(1e-4, 0.5), initial_accumulator_value=st.floats(1e-3, 1.0)
    ),
}  # fmt: skip
FLAGS = {"torch_rmsprop": ("centered", "maximize"), "torch_adagrad": ("maximize",),
         "keras_rmsprop": ("centered",), "tf1_rmsprop": ("centered",)}  # fmt: skip
HYPOTHESIS_STEPS = 20


@functools.cache
def traced_runner(preset: str, flags: tuple):
    """One compiled function per preset and flags: the float hyperparameters are traced,
    so hypothesis' examples reuse it (and presets are checked with traced values)."""

    @jax.jit
    def run(hyper, params, grads):
        tx = getattr(compat, preset)(**hyper, **dict(flags))

        def step(carry, g):
            params, state = carry
            updates, state = tx.update(tree_of(g), state, params)
            params = rj.apply_updates(params, updates)
            return (params, state), flat_of(params)

        return jax.lax.scan(step, (params, tx.init(params)), grads)[1]

    return run


@pytest.mark.parametrize("preset", sorted(HYPER))
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_hyperparameters_match_float64_transcription(preset, data):
    flags = tuple((name, data.draw(st.booleans(), label=name)) for name in FLAGS.get(preset, ()))
    strategies = dict(HYPER[preset])
    if dict(flags).get("centered"):
        # With a decay near 0 the variance estimate v - m^2 is a difference of two
        # nearly equal numbers: its rounding is noise in float32 (and torch's lerp form
        # makes it negative, hence NaN, even in float64). Realistic decays only.
        decay = {"torch_rmsprop": "alpha", "keras_rmsprop": "rho", "tf1_rmsprop": "decay"}
        strategies[decay[preset]] = st.floats(0.5, 0.999)
    hyper = {name: data.draw(strategy, label=name) for name, strategy in strategies.items()}
    problem = stored()
    params0, grads = problem["params0"], problem["grads"][:HYPOTHESIS_STEPS]
    run = traced_runner(preset, flags)
    traced = {k: jnp.asarray(v, jnp.float32) for k, v in hyper.items()}
    actual = np.asarray(run(traced, jax.tree.map(jnp.asarray, tree_of(params0)), grads))
    expected = REFERENCES[preset](params0, grads, **hyper, **dict(flags))
    assert_trajectories_close(actual, expected, rtol=5 * RTOL, atol=5 * ATOL)


# ------------------------------------------------------------------------ bad input

REJECTED = [
    # (preset, arguments, the argument named, allowed range in the message)
    ("torch_rmsprop", {"lr": -1e-3}, "lr", ">= 0"),
    ("torch_rmsprop", {"lr": float("nan")}, "lr", "a number >= 0 (not NaN)"),
    ("torch_rmsprop", {"alpha": -0.1}, "alpha", "in [0, 1)"),
    ("torch_rmsprop", {"alpha": 1.5}, "alpha", "in [0, 1)"),
    ("torch_rmsprop", {"eps": -1e-8}, "eps", ">= 0"),
    ("torch_rmsprop", {"weight_decay": -0.1}, "weight_decay", ">= 0"),
    ("torch_rmsprop", {"momentum": -0.9}, "momentum", "in [0, 1)"),
    ("torch_rmsprop", {"centered": "yes"}, "centered", "True or False"),
    ("torch_rmsprop", {"maximize": 1}, "maximize", "True or False"),
    ("torch_adagrad", {"lr": -0.1}, "lr", ">= 0"),
    ("torch_adagrad", {"lr_decay": -0.1}, "lr_decay", ">= 0"),
    ("torch_adagrad", {"weight_decay": -0.1}, "weight_decay", ">= 0"),
    ("torch_adagrad", {"initial_accumulator_value": -0.1}, "initial_accumulator_value", ">= 0"),
    ("torch_adagrad", {"eps": -1e-10}, "eps", ">= 0"),
    ("torch_adagrad", {"maximize": None}, "maximize", "True or False"),
    ("keras_rmsprop", {"learning_rate": -1e-3}, "learning_rate", ">= 0"),
    ("keras_rmsprop", {"rho": 1.0}, "rho", "in [0, 1)"),
    ("keras_rmsprop", {"momentum": -0.5}, "momentum", "in [0, 1)"),
    ("keras_rmsprop", {"epsilon": -1e-7}, "epsilon", ">= 0"),
    ("keras_rmsprop", {"weight_decay": -0.01}, "weight_decay", ">= 0"),
    ("keras_rmsprop", {"centered": 0}, "centered", "True or False"),
    ("keras_adagrad", {"learning_rate": -1e-3}, "learning_rate", ">= 0"),
    ("keras_adagrad", {"initial_accumulator_value": -0.1}, "initial_accumulator_value", ">= 0"),
    ("keras_adagrad", {"epsilon": -1e-7}, "epsilon", ">= 0"),
    ("keras_adagrad", {"weight_decay": float("inf")}, "weight_decay", "a finite number"),
    ("tf1_rmsprop", {"learning_rate": -1e-3}, "learning_rate", ">= 0"),
    ("tf1_rmsprop", {"learning_rate": 0.1, "decay": -0.1}, "decay", "in [0, 1)"),
    ("tf1_rmsprop", {"learning_rate": 0.1, "momentum": 1.0}, "momentum", "in [0, 1)"),
    ("tf1_rmsprop", {"learning_rate": 0.1, "epsilon": -1.0}, "epsilon", ">= 0"),
    ("tf1_adagrad", {"learning_rate": -0.1}, "learning_rate", ">= 0"),
    ("decoupled_weight_decay", {"weight_decay": -0.1, "learning_rate": 0.1},
     "weight_decay", ">= 0"),
    ("decoupled_weight_decay", {"weight_decay": 0.1, "learning_rate": -0.1},
     "learning_rate", ">= 0"),
    ("inverse_time_decay", {"learning_rate": 0.1, "lr_decay": -1.0}, "lr_decay", ">= 0"),
    ("tf1_adagrad", {"learning_rate": 0.1, "initial_accumulator_value": 0.0},
     "initial_accumulator_value", "> 0"),
    ("tf1_adagrad", {"learning_rate": 0.1, "initial_accumulator_value": -1.0},
     "initial_accumulator_value", "> 0"),
]  # fmt: skip


@pytest.mark.parametrize("preset,arguments,argument,allowed", REJECTED)
def test_preset_rejects_what_its_peer_rejects(preset, arguments, argument, allowed):
    flag = allowed == "True or False"  # anything else is the wrong type for a flag
    with pytest.raises(TypeError if flag else ValueError) as error:
        getattr(compat, preset)(**arguments)
    message = str(error.value)
    value = arguments[argument]
    assert message.startswith(f"rmsjax.compat.{preset}: {argument} must be {allowed}, got ")
    assert message.endswith(f"{value!r} ({type(value).__name__})" if flag else repr(value))


PEER_REJECTS = [
    ("torch_rmsprop", {"lr": -1e-3}),
    ("torch_rmsprop", {"alpha": -0.1}),
    ("torch_rmsprop", {"eps": -1e-8}),
    ("torch_rmsprop", {"weight_decay": -0.1}),
    ("torch_rmsprop", {"momentum": -0.9}),
    ("torch_adagrad", {"lr": -0.1}),
    ("torch_adagrad", {"lr_decay": -0.1}),
    ("torch_adagrad", {"weight_decay": -0.1}),
    ("torch_adagrad", {"initial_accumulator_value": -0.1}),
    ("torch_adagrad", {"eps": -1e-10}),
]


@pytest.mark.parametrize("preset,arguments", PEER_REJECTS)
def test_torch_rejects_the_same_arguments_live(preset, arguments):
    """The torch rows of REJECTED are what torch itself rejects."""
    torch = pytest.importorskip("torch")
    optimizer = {"torch_rmsprop": torch.optim.RMSprop, "torch_adagrad": torch.optim.Adagrad}
    with pytest.raises(ValueError):
        optimizer[preset]([torch.zeros(1, requires_grad=True)], **arguments)
    with pytest.raises(
        ValueError, match=f"rmsjax.compat.{preset}: {next(iter(arguments))} must be"
    ):
        getattr(compat, preset)(**arguments)


def test_traced_and_scheduled_values_pass_unchecked():
    schedule = jax_rate(peers._schedule(1e-2))
    compat.torch_rmsprop(lr=schedule)
    compat.keras_adagrad(learning_rate=schedule, weight_decay=0.1)
    jax.jit(lambda lr: compat.tf1_adagrad(lr).init(jnp.ones(2)))(jnp.float32(0.1))


STORAGE_PRESETS = {
    "torch_rmsprop": lambda **kw: compat.torch_rmsprop(lr=0.01, momentum=0.9, **kw),
    "torch_adagrad": lambda **kw: compat.torch_adagrad(lr=0.01, **kw),
    "keras_rmsprop": lambda **kw: compat.keras_rmsprop(momentum=0.9, centered=True, **kw),
    "keras_adagrad": lambda **kw: compat.keras_adagrad(**kw),
    "tf1_rmsprop": lambda **kw: compat.tf1_rmsprop(0.01, momentum=0.5, **kw),
    "tf1_adagrad": lambda **kw: compat.tf1_adagrad(0.01, **kw),
}


@pytest.mark.parametrize("name", STORAGE_PRESETS)
def test_presets_pass_storage_through(name):
    make = STORAGE_PRESETS[name]
    params = {"big": jnp.linspace(-1.0, 1.0, 8192).reshape(16, 512), "small": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)
    plain, half, eight = make(), make(storage="bfloat16"), make(storage="int8")
    s_plain, s_half, s_eight = (tx.init(params) for tx in (plain, half, eight))
    float_leaves = [x for x in jax.tree.leaves(s_half) if x.ndim > 0]
    assert float_leaves and all(x.dtype == jnp.bfloat16 for x in float_leaves)
    assert any(
        isinstance(x, rj.QuantizedArray)
        for x in jax.tree.leaves(s_eight, is_leaf=lambda x: isinstance(x, rj.QuantizedArray))
    )
    # the step stays close to the float32-state step (bfloat16: 3 significant digits)
    u_plain, _ = plain.update(grads, s_plain, params)
    u_half, s_half2 = half.update(grads, s_half, params)
    u_eight, s_eight2 = eight.update(grads, s_eight, params)
    for u in (u_half, u_eight):
        chex.assert_trees_all_close(u, u_plain, rtol=2e-2, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_half, s_half2)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_eight, s_eight2)


@pytest.mark.parametrize("name", STORAGE_PRESETS)
def test_presets_reject_unknown_storage(name):
    with pytest.raises(ValueError, match=f"rmsjax.compat.{name}: storage must be one of"):
        STORAGE_PRESETS[name](storage="int4")


INJECTED_PRESETS = {
    "torch_rmsprop": (compat.torch_rmsprop, {"lr": 0.01}),
    "torch_rmsprop, momentum 0.0": (compat.torch_rmsprop, {"lr": 0.01, "momentum": 0.0}),
    "keras_rmsprop": (compat.keras_rmsprop, {"learning_rate": 0.01}),
    "tf1_rmsprop": (compat.tf1_rmsprop, {"learning_rate": 0.01}),
    "keras_adagrad, weight_decay 0.0": (
        compat.keras_adagrad,
        {"learning_rate": 0.01, "weight_decay": 0.0},
    ),
}


@pytest.mark.parametrize("preset", INJECTED_PRESETS.values(), ids=INJECTED_PRESETS.keys())
def test_injected_presets_step_under_jit_as_the_plain_preset(preset):
    # A rate of zero leaves a part out of the plain preset; injected, the rate is an
    # array (concrete in init, traced in a jitted update), so the part stays in, with a
    # rate of zero: the state's structure must not depend on where it was traced, and
    # the steps are the plain preset's.
    factory, kwargs = preset
    params = jnp.linspace(-1.0, 1.0, 5)
    grads = [jnp.sin(params * k) for k in range(1, 5)]
    injected = rj.inject_hyperparams(factory)(**kwargs)
    plain = factory(**kwargs)
    s1, s2 = injected.init(params), plain.init(params)
    step = jax.jit(injected.update)
    for g in grads:
        u1, s1 = step(g, s1, params)
        u2, s2 = plain.update(g, s2, params)
        np.testing.assert_allclose(u1, u2, rtol=1e-6, atol=0)


# Each peer's arguments after the parameters, in order: (positional, keyword-only).
PEER_SIGNATURES = {
    "torch_rmsprop": (
        "lr alpha eps weight_decay momentum centered capturable foreach maximize differentiable",
        "",
    ),
    "torch_adagrad": (
        "lr lr_decay weight_decay initial_accumulator_value eps foreach",
        "maximize differentiable fused",
    ),
    "keras_rmsprop": (
        "learning_rate rho momentum epsilon centered weight_decay clipnorm clipvalue "
        "global_clipnorm use_ema ema_momentum ema_overwrite_frequency loss_scale_factor "
        "gradient_accumulation_steps name",
        "",
    ),
    "keras_adagrad": (
        "learning_rate initial_accumulator_value epsilon weight_decay clipnorm clipvalue "
        "global_clipnorm use_ema ema_momentum ema_overwrite_frequency loss_scale_factor "
        "gradient_accumulation_steps name",
        "",
    ),
    # tensorflow/python/training/rmsprop.py and adagrad.py (TF 1.15)
    "tf1_rmsprop": ("learning_rate decay momentum epsilon use_locking centered name", ""),
    "tf1_adagrad": ("learning_rate initial_accumulator_value use_locking name", ""),
}


def _arguments(function):
    import inspect

    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = inspect.signature(function).parameters.values()
    return (
        [p.name for p in parameters if p.kind in positional],
        [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY],
    )


@pytest.mark.parametrize("preset", sorted(PEER_SIGNATURES))
def test_presets_take_the_peer_s_arguments_in_the_peer_s_order(preset):
    # a positional argument must mean what it means to the peer: TF1's fifth RMSprop
    # argument is use_locking, and tf1_rmsprop(lr, d, m, e, True) turned centered on
    positional, keyword_only = _arguments(getattr(compat, preset))
    assert positional == PEER_SIGNATURES[preset][0].split()
    assert keyword_only == [*PEER_SIGNATURES[preset][1].split(), "storage"]
    with pytest.raises(TypeError):
        getattr(compat, preset)(*([0.01] + [0] * len(positional)))


@pytest.mark.parametrize(
    "preset,peer",
    [
        ("torch_rmsprop", "torch.optim.RMSprop"),
        ("torch_adagrad", "torch.optim.Adagrad"),
        ("keras_rmsprop", "keras.optimizers.RMSprop"),
        ("keras_adagrad", "keras.optimizers.Adagrad"),
    ],
)
def test_the_recorded_signatures_are_the_live_peer_s(preset, peer):
    import inspect

    live_peer_available(preset)
    module, _, cls = peer.rpartition(".")
    theirs = getattr(importlib.import_module(module), cls)
    positional, keyword_only = _arguments(theirs)
    skip = {"self", "params"}
    assert [a for a in positional if a not in skip] == PEER_SIGNATURES[preset][0].split()
    assert keyword_only == PEER_SIGNATURES[preset][1].split()
    # and the defaults are the peer's
    ours = inspect.signature(getattr(compat, preset)).parameters
    for argument, parameter in inspect.signature(theirs).parameters.items():
        if argument in ours and parameter.default is not inspect.Parameter.empty:
            assert ours[argument].default == parameter.default, argument


@pytest.mark.parametrize(
    "preset,options",
    [
        ("torch_rmsprop", dict(capturable=True, foreach=True, differentiable=True)),
        ("torch_adagrad", dict(foreach=False, differentiable=True, fused=True)),
        ("keras_rmsprop", dict(name="rmsprop", ema_momentum=0.5)),
        ("tf1_rmsprop", dict(use_locking=True, name="opt")),
        ("tf1_adagrad", dict(use_locking=True, name="opt")),
    ],
)
def test_how_the_peer_runs_a_step_is_accepted_and_changes_no_number(preset, options):
    params = jnp.linspace(-1.0, 1.0, 6)
    grads = [jnp.sin(params * (t + 1)) for t in range(4)]
    plain, given = getattr(compat, preset)(0.1), getattr(compat, preset)(0.1, **options)
    s1, s2 = plain.init(params), given.init(params)
    for g in grads:
        u1, s1 = plain.update(g, s1, params)
        u2, s2 = given.update(g, s2, params)
        np.testing.assert_array_equal(u1, u2)
    for argument in options:
        if argument == "ema_momentum":  # read only with use_ema, as in Keras
            continue
        with pytest.raises(TypeError, match=rf"^rmsjax\.compat\.{preset}: {argument} must"):
            getattr(compat, preset)(0.1, **{argument: "yes" if argument != "name" else 3})


@pytest.mark.parametrize("preset", ["keras_rmsprop", "keras_adagrad"])
@pytest.mark.parametrize(
    "argument,value,instead",
    [
        ("clipnorm", 1.0, "which no rmsjax transformation does"),
        ("clipvalue", 0.5, r"rj\.chain\(rj\.clip\(0\.5\), rmsjax\.compat\.keras_"),
        ("global_clipnorm", 1.0, r"rj\.chain\(rj\.clip_by_global_norm\(1\.0\)"),
        ("use_ema", True, "moving average of the parameters"),
        ("loss_scale_factor", 128.0, "unscaled loss"),
        ("gradient_accumulation_steps", 4, r"rj\.accumulate_gradients\(rmsjax\.compat"),
    ],
)
def test_keras_options_that_change_the_numbers_name_what_to_compose(
    preset, argument, value, instead
):
    with pytest.raises(
        ValueError,
        match=rf"^rmsjax\.compat\.{preset}: {argument}={value!r} is not reproduced .*{instead}",
    ):
        getattr(compat, preset)(0.01, **{argument: value})
    if argument == "use_ema":  # NumPy's False is off, as the flags take it
        getattr(compat, preset)(0.01, use_ema=np.False_)


@pytest.mark.parametrize("preset", ["keras_rmsprop", "keras_adagrad"])
def test_keras_options_keras_reads_as_off_or_refuses_are_checked_before_the_advice(preset):
    # the advice repeated values no composition takes (rj.clip(-1.0), 1.5 steps)
    make = getattr(compat, preset)
    for argument in ("clipnorm", "clipvalue", "global_clipnorm"):
        with pytest.raises(ValueError, match=rf"^rmsjax\.compat\.{preset}: {argument} must be > 0"):
            make(0.01, **{argument: -1.0})
        make(0.01, **{argument: 0.0})  # Keras clips nothing at 0
    for steps, error in ((1.5, TypeError), (1, ValueError)):  # as Keras refuses them
        with pytest.raises(error, match="gradient_accumulation_steps must be an integer >= 2"):
            make(0.01, gradient_accumulation_steps=steps)
    make(0.01, gradient_accumulation_steps=0)  # Keras accumulates nothing at 0
    # a loss scale of 1 divides the gradients by 1: the preset's own numbers
    params, g = jnp.linspace(-1.0, 1.0, 6), jnp.cos(jnp.arange(6.0))
    for factor in (1.0, 1, np.float32(1.0), np.array(1.0), jnp.array(1.0)):
        scaled, plain = make(0.01, loss_scale_factor=factor), make(0.01)
        chex.assert_trees_all_equal(
            scaled.update(g, scaled.init(params), params),
            plain.update(g, plain.init(params), params),
        )


@pytest.mark.parametrize("schedule", [False, True])
def test_keras_gradient_accumulation_is_accumulate_gradients_around_the_preset(schedule):
    # what the refusal of gradient_accumulation_steps tells the user to write, live
    live_peer_available("keras_rmsprop")
    import keras

    k = 3
    rng = np.random.default_rng(4)
    params0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4 * k)]
    rate = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.8) if schedule else 0.05
    ours_rate = (lambda count: 0.05 * 0.8 ** (k * count + k - 1)) if schedule else 0.05
    variable = keras.Variable(params0)
    theirs = keras.optimizers.RMSprop(
        rate, momentum=0.9, weight_decay=0.1, gradient_accumulation_steps=k
    )
    tx = rj.accumulate_gradients(compat.keras_rmsprop(ours_rate, momentum=0.9, weight_decay=0.1), k)
    params, state = jnp.asarray(params0), tx.init(jnp.asarray(params0))
    for g in grads:
        theirs.apply_gradients([(g, variable)])
        params, state = rj.update_and_apply(tx, jnp.asarray(g), state, params)
        np.testing.assert_allclose(np.asarray(params), np.asarray(variable.value), atol=5e-7)


def test_torch_adagrad_lr_decay_runs_in_float64_with_x64():
    # the decayed rate was computed from a float32 count: 1.4e-7 off torch's float64 run
    rng = np.random.default_rng(3)
    params0, grads = rng.normal(size=6), rng.normal(size=(12, 6))
    expected = reference_torch_adagrad(params0, grads, lr=0.1, lr_decay=0.1)
    with jax.enable_x64(True):
        tx = compat.torch_adagrad(lr=0.1, lr_decay=0.1)
        p = jnp.asarray(params0, jnp.float64)
        state, got = tx.init(p), []
        for g in grads:
            updates, state = tx.update(jnp.asarray(g, jnp.float64), state, p)
            p = rj.apply_updates(p, updates)
            got.append(np.asarray(p))
        assert p.dtype == jnp.float64
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-13, atol=0)


def _peer_schedules(live: str | None = None) -> dict:
    """The records of tests/fixtures/generate_peer_schedules.py, or, with ``live`` the
    name of an importable peer, that peer's run of the same problem."""
    from tests.fixtures import generate_peer_schedules as record

    stored = np.load(pathlib.Path(record.__file__).with_name("peer_schedules.npz"))
    if live is None:
        return dict(stored)
    runs = [record.torch_one_cycle]
    if live == "keras":
        runs = [record.keras_ema, record.keras_clipnorm]
    return {
        f"{live}_{k}": v for run in runs for k, v in run(stored["params"], stored["grads"]).items()
    }


@pytest.mark.parametrize("source", ["recorded", "live"])
def test_torch_one_cycle_schedules_the_momentum_too_through_inject_hyperparams(source):
    # OneCycleLR (and CyclicLR) cycle RMSprop's momentum by default, even from momentum=0:
    # a learning-rate schedule alone ran far from torch; both schedules injected match
    stored = _peer_schedules()
    if source == "live":
        live_peer_available("torch_rmsprop")
        stored.update(_peer_schedules("torch"))
    rates, momenta = jnp.asarray(stored["torch_rates"]), jnp.asarray(stored["torch_momenta"])
    assert float(momenta[0]) > 0.9  # switched on by the scheduler
    tx = rj.inject_hyperparams(compat.torch_rmsprop)(
        lr=lambda count: rates[count], momentum=lambda count: momenta[count]
    )
    params = jnp.asarray(stored["params"])
    state, step = tx.init(params), jax.jit(functools.partial(rj.update_and_apply, tx))
    for g in stored["grads"]:
        params, state = step(jnp.asarray(g), state, params)
    np.testing.assert_allclose(params, stored["torch_final"], rtol=1e-5)
    # the learning rate alone does not
    plain = rj.inject_hyperparams(compat.torch_rmsprop)(lr=lambda count: rates[count])
    params, state = jnp.asarray(stored["params"]), plain.init(jnp.asarray(stored["params"]))
    for g in stored["grads"]:
        params, state = rj.update_and_apply(plain, jnp.asarray(g), state, params)
    assert np.max(np.abs(np.asarray(params) - stored["torch_final"])) > 0.1


@pytest.mark.parametrize("source", ["recorded", "live"])
def test_keras_use_ema_refusal_gives_keras_moving_average(source):
    # the advice named optax.ema, which starts from 0 (0.11-0.41 relative from Keras'
    # average after 10 steps); the recurrence it gives now is Keras'
    with pytest.raises(ValueError, match=r"avg = params after the first step, then avg = "):
        compat.keras_rmsprop(0.01, use_ema=True)
    stored = _peer_schedules()
    if source == "live":
        live_peer_available("keras_rmsprop")
        stored.update(_peer_schedules("keras"))
    average = None
    for params in np.asarray(stored["keras_trajectory"], np.float64):
        average = params if average is None else 0.9 * average + 0.1 * params
    np.testing.assert_allclose(stored["keras_average"], average, rtol=1e-6)


@pytest.mark.parametrize("source", ["recorded", "live"])
def test_keras_clipnorm_refusal_composes_keras_per_variable_clip(source):
    # the advice named no transformation; the composition it spells out now is Keras'
    with pytest.raises(ValueError) as refusal:
        compat.keras_rmsprop(0.01, clipnorm=0.5)
    stored = _peer_schedules()
    if source == "live":
        live_peer_available("keras_rmsprop")
        stored.update(_peer_schedules("keras"))
    composed = str(refusal.value).split("compose ", 1)[1]
    composed, imports = composed.split(", with ", 1)  # the names it needs are said
    assert imports == "jax, jax.numpy as jnp and rmsjax as rj imported"
    assert composed.startswith("rj.chain(") and composed.endswith("compat.keras_rmsprop(...))")
    tx = eval(composed.replace("rmsjax.compat.keras_rmsprop(...)", "compat.keras_rmsprop(0.01)"))
    params = jnp.asarray(stored["params"])
    state = tx.init(params)
    for g, keras_params in zip(stored["grads"], stored["keras_clipped"]):
        params, state = rj.update_and_apply(tx, jnp.asarray(g), state, params)
        np.testing.assert_allclose(params, keras_params, rtol=1e-5, atol=1e-6)
    # the clip is active: Keras' unclipped run is elsewhere
    assert np.max(np.abs(stored["keras_trajectory"][-1] - stored["keras_clipped"][-1])) > 1e-3


@pytest.mark.parametrize("source", ["recorded", "live"])
def test_keras_ema_overwrite_refusal_gives_keras_training_run(source):
    # with ema_overwrite_frequency Keras writes the average into the parameters: the
    # advice left that out, and following it ran 0.34 away from Keras in 12 steps
    with pytest.raises(ValueError, match=r"after every 5th step \(after its average\) params"):
        compat.keras_rmsprop(0.01, use_ema=True, ema_overwrite_frequency=5)
    stored = _peer_schedules()
    if source == "live":
        live_peer_available("keras_rmsprop")
        stored.update(_peer_schedules("keras"))
    tx = compat.keras_rmsprop(0.01)
    params = jnp.asarray(stored["params"])
    state, average = tx.init(params), None
    for t, (g, keras_params) in enumerate(zip(stored["grads"], stored["keras_overwritten"])):
        params, state = rj.update_and_apply(tx, jnp.asarray(g), state, params)
        average = params if average is None else 0.9 * average + 0.1 * params
        if (t + 1) % 5 == 0:
            params = average
        np.testing.assert_allclose(params, keras_params, rtol=1e-5, atol=1e-6)
    # without the overwrite the run is Keras' plain one, far from this
    assert np.max(np.abs(stored["keras_trajectory"][-1] - stored["keras_overwritten"][-1])) > 1e-3


def _foreign_scalar(value, module="tensorflow"):
    """A one-element tensor of another framework, as rmsjax sees one: NumPy reads it as a
    number (``__array__``), JAX's arithmetic does not; ``module`` is its type's module."""

    class Tensor:
        def __array__(self, dtype=None, copy=None):
            return np.asarray(value, dtype)

        def numel(self):
            return 1

        def item(self):
            return value

        def __repr__(self):
            return f"tensor({value})"

    Tensor.__module__ = module
    return Tensor()


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda v: rj.rmsprop(v), "learning_rate"),
        (lambda v: rj.compat.torch_rmsprop(momentum=v), "momentum"),
        (lambda v: rj.compat.keras_adagrad(learning_rate=v), "learning_rate"),
        (lambda v: rj.trace(v), "decay"),
    ],
)
def test_another_frameworks_scalar_is_refused_where_the_optimizer_is_built(make, argument):
    # A torch tensor lr passed the range check (NumPy reads it as a number), then the
    # first step failed inside JAX: "Cannot interpret 'torch.float32' as a data type"
    with pytest.raises(
        TypeError, match=rf"{argument} must be a real number.*\(float\({argument}\) converts a"
    ):
        make(_foreign_scalar(0.5))


def test_torch_presets_read_a_one_element_tensor_lr_as_torch_does():
    # torch documents lr (float, Tensor); the presets read it once, as a float
    params, grads = jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0])
    for make in (
        lambda lr: rj.compat.torch_rmsprop(lr=lr, momentum=0.5),
        lambda lr: rj.compat.torch_adagrad(lr=lr, lr_decay=0.1),
    ):
        want = make(0.25).update(grads, make(0.25).init(params), params)[0]
        tx = make(_foreign_scalar(0.25, module="torch"))
        np.testing.assert_array_equal(tx.update(grads, tx.init(params), params)[0], want)
    with pytest.raises(ValueError, match=r"torch_rmsprop: lr must be >= 0, got -1.0$"):
        rj.compat.torch_rmsprop(lr=_foreign_scalar(-1.0, module="torch"))


def test_a_live_torch_tensor_lr_steps_as_torch():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    theirs = torch.optim.RMSprop([p], lr=torch.tensor(0.01), momentum=0.9)
    tx = rj.compat.torch_rmsprop(lr=torch.tensor(0.01), momentum=0.9)
    params = jnp.array([1.0, -2.0])
    state = tx.init(params)
    for step in range(5):
        grads = np.array([0.5, -3.0], np.float32) * (step + 1)
        p.grad = torch.tensor(grads)
        theirs.step()
        updates, state = tx.update(jnp.asarray(grads), state, params)
        params = rj.apply_updates(params, updates)
    np.testing.assert_allclose(params, p.detach().numpy(), rtol=1e-6)


def test_a_keras_preset_name_cannot_hold_a_slash_as_in_keras():
    with pytest.raises(ValueError, match=r"keras_rmsprop: name must be a string without '/'"):
        rj.compat.keras_rmsprop(name="a/b")
    rj.compat.tf1_rmsprop(0.1, name="a/b")  # TF1's names are scopes: '/' allowed


@pytest.mark.parametrize("preset, eps", [("torch_rmsprop", "eps"), ("keras_rmsprop", "epsilon")])
def test_rmsprop_presets_with_eps_zero_step_a_never_moved_element_by_zero(preset, eps):
    # 0 / sqrt(0): the peers' NaN (porting.md, "NaN where the peer has one"), a 0 here
    g = jnp.array([0.0, 1.0, 0.0, 2.0])
    params = jnp.ones(4)
    tx = getattr(compat, preset)(0.01, **{eps: 0.0})
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_array_equal(updates[::2], [0.0, 0.0])
    assert bool(jnp.isfinite(updates).all()) and bool((updates[1::2] < 0).all())
    live_peer_available(preset)
    if preset.startswith("torch"):
        import torch

        p = torch.ones(4, requires_grad=True)
        opt = torch.optim.RMSprop([p], lr=0.01, eps=0.0)
        p.grad = torch.tensor(np.asarray(g))
        opt.step()
        theirs = p.detach().numpy()
    else:
        import keras

        variable = keras.Variable(np.ones(4, np.float32))
        keras.optimizers.RMSprop(0.01, epsilon=0.0).apply_gradients([(g, variable)])
        theirs = np.asarray(variable.value)
    assert np.isnan(theirs[::2]).all()
