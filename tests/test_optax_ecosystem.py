"""rmsjax transformations inside optax's own tools, and optax's signatures, checked live.

An optax user keeps optax's combinators (MultiSteps, multi_transform, inject_hyperparams,
apply_if_finite, contrib schedules that read extra arguments), its tree utilities and
flax's TrainState when switching the import. Each test runs the same code with optax's
transformation and with rmsjax's and asks for the same bits.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.array([0.5, -2.0])}


def _grads(step):
    rng = np.random.default_rng(step)
    return jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-2, 1), p.dtype),
        PARAMS,
    )


def _trajectory(tx, steps=5, **extra):
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    params, state = PARAMS, tx.init(PARAMS)
    for step in range(steps):
        updates, state = update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _assert_same_bits(ours, theirs):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)


# Each case builds a transformation from a module: rmsjax's or optax's parts, inside
# optax's combinators either way.
COMBINED = {
    "optax.chain": lambda m: optax.chain(m.clip_by_global_norm(1.0), m.rmsprop(0.1)),
    "optax.named_chain": lambda m: optax.named_chain(
        ("clip", m.clip(0.5)), ("rms", m.adagrad(0.1))
    ),
    "optax.MultiSteps": lambda m: optax.MultiSteps(m.rmsprop(0.1, momentum=0.9), 2),
    "optax.apply_if_finite": lambda m: optax.apply_if_finite(m.adagrad(0.1), 3),
    "optax.inject_hyperparams": lambda m: optax.inject_hyperparams(m.rmsprop)(
        learning_rate=optax.linear_schedule(0.1, 0.01, 4), decay=0.8
    ),
    "optax.masked": lambda m: optax.masked(m.rmsprop(0.1, centered=True), {"w": True, "b": False}),
    "optax.multi_transform": lambda m: optax.multi_transform(
        {"a": m.rmsprop(0.1, momentum=0.5), "b": m.adagrad(0.2)}, {"w": "a", "b": "b"}
    ),
    "optax.partition": lambda m: optax.partition(
        {"a": m.sgd(0.1, momentum=0.9), "b": m.rmsprop(0.2)}, {"w": "a", "b": "b"}
    ),
}


@pytest.mark.parametrize("name", sorted(COMBINED))
def test_optax_combinators_around_rmsjax_give_optax_bits(name):
    _assert_same_bits(_trajectory(COMBINED[name](rj)), _trajectory(COMBINED[name](optax)))


@pytest.mark.parametrize("chain", [rj.chain, optax.chain])
def test_an_optax_part_that_reads_extra_arguments_gets_them_through_a_chain(chain):
    # reduce_on_plateau reads `value`; with a loss that never improves it cuts the scale
    loss = jnp.array(1.0)
    contrib = optax.contrib.reduce_on_plateau(patience=1, cooldown=0, factor=0.5)
    ours = chain(rj.rmsprop(0.1), contrib)
    theirs = optax.chain(optax.rmsprop(0.1), contrib)
    _assert_same_bits(_trajectory(ours, 6, value=loss), _trajectory(theirs, 6, value=loss))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.chain(tx),
        lambda tx: optax.MultiSteps(tx, 2),
        lambda tx: optax.apply_if_finite(tx, 2),
    ],
)
def test_inside_optax_wrappers_as_optax_passes_extra_arguments_on(wrap):
    # optax's wrappers hand extra arguments only to their own ExtraArgs type and drop
    # them for anything else (docs/porting.md): an rj.chain that holds reduce_on_plateau
    # gets its `value` there through rj.as_optax
    loss = jnp.array(1.0)

    def contrib():
        return optax.contrib.reduce_on_plateau(patience=1, cooldown=0, factor=0.5)

    ours = wrap(rj.as_optax(rj.chain(rj.rmsprop(0.1), contrib())))
    theirs = wrap(optax.chain(optax.rmsprop(0.1), contrib()))
    _assert_same_bits(_trajectory(ours, 6, value=loss), _trajectory(theirs, 6, value=loss))
    bare = wrap(rj.chain(rj.rmsprop(0.1), contrib()))
    with pytest.raises(TypeError, match="value"):
        bare.update(PARAMS, bare.init(PARAMS), PARAMS, value=loss)


def _injected(module):
    return module.inject_hyperparams(module.rmsprop)(learning_rate=0.1)


def test_optax_tree_utils_read_and_set_injected_hyperparameters():
    state = _injected(rj).init(PARAMS)
    assert float(optax.tree_utils.tree_get(state, "learning_rate")) == pytest.approx(0.1)
    ours = optax.tree_utils.tree_set(state, learning_rate=0.03)
    theirs = optax.tree_utils.tree_set(_injected(optax).init(PARAMS), learning_rate=0.03)
    u1, s1 = jax.jit(_injected(rj).update)(_grads(0), ours, PARAMS)
    u2, s2 = jax.jit(_injected(optax).update)(_grads(0), theirs, PARAMS)
    _assert_same_bits(u1, u2)
    assert float(s1.hyperparams["learning_rate"]) == pytest.approx(0.03)


@pytest.mark.parametrize("set_before", [False, True])
def test_a_state_from_tree_set_keeps_its_structure_through_a_scan(set_before):
    # optax's tree_set hands the hyperparameters back as a plain dict; a scan's carry must
    # come out of each step with the structure it went in with
    tx = _injected(rj)
    state = tx.init(PARAMS)
    if set_before:
        state = optax.tree_utils.tree_set(state, learning_rate=0.05)

    def body(carry, g):
        params, state = carry
        updates, new_state = tx.update(g, state, params)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        return (optax.apply_updates(params, updates), new_state), None

    grads = jax.tree.map(lambda *g: jnp.stack(g), *[_grads(i) for i in range(3)])
    (params, state), _ = jax.lax.scan(body, (PARAMS, state), grads)

    theirs = _injected(optax)
    other = theirs.init(PARAMS)
    if set_before:
        other = optax.tree_utils.tree_set(other, learning_rate=0.05)
    expected = PARAMS
    for i in range(3):
        updates, other = jax.jit(theirs.update)(_grads(i), other, expected)
        expected = optax.apply_updates(expected, updates)
    np.testing.assert_allclose(params["w"], expected["w"], rtol=1e-6)


def test_tree_set_inside_a_scan_or_a_cond_keeps_the_carry_structure():
    # tree_set called inside the loop: its plain dict of hyperparameters went into a carry
    # that came in holding rmsjax's Hyperparams (scan: "carry input and carry output must
    # have the same pytree structure"); both now flatten alike, and the numbers are optax's
    results = []
    for module in (rj, optax):
        tx = _injected(module)

        def body(carry, i, tx=tx):
            params, state = carry
            state = optax.tree_utils.tree_set(state, learning_rate=0.1 / (1.0 + i))
            updates, state = tx.update(jax.tree.map(jnp.cos, params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (PARAMS, tx.init(PARAMS)), jnp.arange(4))
        results.append(params)

        def maybe_set(state, flag):
            set_it = lambda s: optax.tree_utils.tree_set(s, learning_rate=0.5)  # noqa: E731
            return jax.lax.cond(flag, set_it, lambda s: s, state), None

        state, _ = jax.lax.scan(maybe_set, tx.init(PARAMS), jnp.array([True, False]))
        assert float(state.hyperparams["learning_rate"]) == 0.5
    _assert_same_bits(*results)
    state = _injected(rj).init(PARAMS)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert ".hyperparams['learning_rate']" in paths and paths[0] == ".count"
    assert isinstance(jax.tree.map(lambda x: x, state).hyperparams, rj.Hyperparams)


def test_a_compiled_step_is_traced_once_per_tree_set_not_per_step():
    # the first step after tree_set compiles anew (a plain dict, a Python float); the
    # steps after it reuse that compilation, as optax's do
    tx = _injected(rj)
    traces = []

    @jax.jit
    def step(params, state, g):
        traces.append(1)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(PARAMS, tx.init(PARAMS), _grads(0))
    for rate in [0.02, 0.03]:
        state = optax.tree_utils.tree_set(state, learning_rate=rate)
        for i in range(3):
            params, state = step(params, state, _grads(i))
    assert len(traces) == 2
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.03)
    # docs/porting.md: a float32 array set with tree_set, or an item assignment, does not
    state = optax.tree_utils.tree_set(state, learning_rate=jnp.float32(0.04))
    params, state = step(params, state, _grads(0))
    state.hyperparams["learning_rate"] = 0.05
    params, state = step(params, state, _grads(1))
    assert len(traces) == 2


def test_int8_state_has_named_key_paths():
    state = rj.rmsprop(0.1, momentum=0.9, storage="int8").init({"w": jnp.ones(4096)})
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
    assert "[0].nu['w'].codes" in paths and "[0].nu['w'].scale" in paths
    assert "[2].trace['w'].codes" in paths


def test_tree_map_params_reaches_float_state_not_int8_or_grouped_as_documented():
    # docs/porting.md, "What still differs": tree_map_params maps the subtrees shaped
    # like the parameters; int8 codes and grouped blocks are not.
    params = {"w": jnp.ones((64, 64))}
    seen = []

    def record(leaf):
        seen.append(jnp.shape(leaf))
        return leaf

    for storage in [None, "bfloat16"]:
        tx = rj.rmsprop(0.1, storage=storage)
        optax.tree_utils.tree_map_params(tx, record, tx.init(params))
    assert seen == [(64, 64), (64, 64)]
    tx = rj.rmsprop(0.1, storage="int8")
    seen.clear()
    optax.tree_utils.tree_map_params(tx, record, tx.init(params))
    assert sorted(seen) == [(16,), (16, 256)]  # the scales and the codes
    tx = rj.grouped(rj.rmsprop(0.1))
    with pytest.raises(ValueError):
        optax.tree_utils.tree_map_params(tx, record, tx.init(params))


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m.rmsprop(0.1),
        lambda m: m.rmsprop(0.1, centered=True, momentum=0.9),
        lambda m: m.adagrad(0.1),
        lambda m: m.sgd(0.1, momentum=0.9),
        lambda m: m.chain(m.add_decayed_weights(0.1), m.ema(0.9)),
    ],
)
def test_lower_precision_gradients_give_updates_in_optax_s_promoted_dtype(make):
    # bfloat16 gradients of float32 parameters: optax's updates are float32 (its state
    # is); rounded to bfloat16 they lost 0.4%. The arithmetic is float32 here, where
    # optax squares the gradient in bfloat16 first (docs/porting.md).
    params = jnp.linspace(0.5, 1.5, 4)
    grads = jnp.asarray([0.3, -0.7, 1.1, 0.05], jnp.bfloat16)
    ours, theirs = make(rj), make(optax)
    mine = ours.update(grads, ours.init(params), params)[0]
    assert mine.dtype == theirs.update(grads, theirs.init(params), params)[0].dtype
    exact = ours.update(grads.astype(jnp.float32), ours.init(params), params)[0]
    np.testing.assert_array_equal(mine, exact)  # the float32 step on the same values


def test_flax_train_state_steps_as_with_optax():
    train_state = pytest.importorskip("flax.training.train_state")

    def run(tx):
        state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
        step = jax.jit(lambda state, g: state.apply_gradients(grads=g))
        for i in range(4):
            state = step(state, _grads(i))
        return state.params

    _assert_same_bits(run(rj.rmsprop(0.1, momentum=0.9)), run(optax.rmsprop(0.1, momentum=0.9)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.rmsprop(0.1, momentum=0.9, storage="int8"),
        lambda: rj.grouped(rj.rmsprop(0.1, momentum=0.9)),
        lambda: rj.grouped(rj.adagrad(0.1, storage="int8")),
    ],
)
def test_flax_serialization_saves_int8_and_grouped_states(make):
    # a QuantizedArray and a GroupedState's TreeStructure reached msgpack as they were
    serialization = pytest.importorskip("flax.serialization")
    params = {"a": jnp.linspace(-1.0, 1.0, 4096), "b": jnp.ones(4096), "c": jnp.ones((2, 2))}
    tx = make()
    state = tx.update(params, tx.init(params), params)[1]
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    _assert_same_bits(tx.update(params, restored, params)[0], tx.update(params, state, params)[0])


def test_flax_serialization_works_with_flax_imported_after_the_state_is_made():
    # registration where a state was made missed a flax imported later (by a checkpoint
    # helper, say); rmsjax itself must not import flax
    pytest.importorskip("flax.serialization")
    script = textwrap.dedent(
        """
        import sys
        import jax.numpy as jnp
        import rmsjax as rj
        assert "flax" not in sys.modules
        params = {"a": jnp.ones((64, 80)), "b": jnp.ones((64, 80))}
        states = [
            rj.rmsprop(1e-2, momentum=0.9, storage="int8").init(params),
            rj.grouped(rj.adagrad(0.1)).init(params),
            rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1).init(params),
        ]
        from flax import serialization
        for state in states:
            serialization.from_bytes(state, serialization.to_bytes(state))
        print("saved", len(states))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "saved 3" in result.stdout


def test_wrappers_hand_every_extra_to_optax_extra_args_transformations():
    # optax passes every extra to a GradientTransformationExtraArgs, whatever its update
    # declares; rmsjax's wrappers passed them only to an update with **kwargs
    def update(updates, state, params=None, *, loss):
        return jax.tree.map(lambda u: u * loss, updates), state

    tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
    params = jnp.ones(2)
    for ours, theirs in (
        (rj.chain(rj.scale(2.0), tx), optax.chain(optax.scale(2.0), tx)),
        (rj.with_extra_args_support(tx), optax.with_extra_args_support(tx)),
        (rj.masked(tx, True), optax.masked(tx, True)),
        (rj.apply_if_finite(tx, 3), optax.apply_if_finite(tx, 3)),
    ):
        mine = ours.update(params, ours.init(params), None, loss=3.0)[0]
        np.testing.assert_array_equal(
            mine, theirs.update(params, theirs.init(params), None, loss=3.0)[0]
        )


def test_flax_serialization_saves_and_restores_injected_hyperparameters():
    # flax finds its converters by exact type: a Hyperparams (a dict subclass) reached
    # msgpack as it was, and to_bytes of a TrainState failed where optax's saved
    serialization = pytest.importorskip("flax.serialization")
    train_state = pytest.importorskip("flax.training.train_state")
    for tx in (
        rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, momentum=0.9),
        optax.inject_hyperparams(optax.rmsprop)(learning_rate=0.1, momentum=0.9),
    ):
        state = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
        state = state.apply_gradients(grads=_grads(0))
        state.opt_state.hyperparams["learning_rate"] = 0.05
        restored = serialization.from_bytes(
            train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx),
            serialization.to_bytes(state),
        )
        assert type(restored.opt_state.hyperparams) is type(state.opt_state.hyperparams)
        assert float(restored.opt_state.hyperparams["learning_rate"]) == np.float32(0.05)
        _assert_same_bits(
            restored.apply_gradients(grads=_grads(1)).params,
            state.apply_gradients(grads=_grads(1)).params,
        )


# ------------------------------------------------------------------------ signatures

# rmsjax may add keyword arguments of its own (storage, centered, ...) after optax's,
# each with a default; optax's own must keep their names, kinds, defaults and order.
SHARED = [
    "rmsprop",
    "adagrad",
    "sgd",
    "scale_by_rms",
    "scale_by_rss",
    "trace",
    "ema",
    "scale",
    "scale_by_learning_rate",
    "clip",
    "clip_by_global_norm",
    "add_decayed_weights",
    "masked",
    "apply_if_finite",
    "inject_hyperparams",
    "identity",
    "apply_updates",
    "global_norm",
    "with_extra_args_support",
    "chain",
]
SHARED_SCHEDULES = [
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "linear_schedule",
    "piecewise_constant_schedule",
    "warmup_cosine_decay_schedule",
]


def _shape(parameter):
    default = parameter.default
    if isinstance(default, float):
        default = float(default)
    return parameter.name, parameter.kind, default


@pytest.mark.parametrize(
    "module, name", [(rj, n) for n in SHARED] + [(rj.schedules, n) for n in SHARED_SCHEDULES]
)
def test_optax_names_defaults_and_order(module, name):
    theirs = list(inspect.signature(getattr(optax, name)).parameters.values())
    ours = list(inspect.signature(getattr(module, name)).parameters.values())
    if theirs and theirs[0].kind is inspect.Parameter.VAR_POSITIONAL:
        assert ours[0].kind is inspect.Parameter.VAR_POSITIONAL
        return
    assert [_shape(p) for p in ours[: len(theirs)]] == [_shape(p) for p in theirs]
    for extra in ours[len(theirs) :]:
        assert extra.default is not inspect.Parameter.empty, extra


def test_every_function_named_as_optax_is_checked_against_optax():
    # a name optax has must mean optax's function: scale_by_factored_rms was a different
    # algorithm (rmsjax's factored RMSprop) under optax's name
    for module, listed in ((rj, SHARED), (rj.schedules, SHARED_SCHEDULES)):
        named = {n for n in module.__all__ if n[:1].islower() and hasattr(optax, n)}
        assert named - {"schedules"} == set(listed)


def test_optax_scale_by_factored_rms_is_not_taken_for_rmsjax_factored_rmsprop():
    with pytest.raises(AttributeError, match="rmsjax has no scale_by_factored_rms: optax's"):
        rj.scale_by_factored_rms  # noqa: B018
    assert "scale_by_factored_rms" not in dir(rj)
    # the message's advice: optax's own chains into rmsjax with optax's numbers
    params = {"w": jnp.ones((160, 130)), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.linspace(-2.0, 3.0, p.size).reshape(p.shape), params)
    ours = rj.chain(optax.scale_by_factored_rms(), rj.scale(-0.1))
    theirs = optax.chain(optax.scale_by_factored_rms(), optax.scale(-0.1))
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(3):
        u1, s1 = jax.jit(ours.update)(grads, s1, params)
        u2, s2 = jax.jit(theirs.update)(grads, s2, params)
    _assert_same_bits(u1, u2)
    with pytest.raises(AttributeError, match="no attribute 'scale_by_nothing'"):
        rj.scale_by_nothing  # noqa: B018


def test_optax_s_top_level_schedules_are_pointed_to_rmsjax_schedules():
    # optax keeps its schedules at its top level; a ported optax.linear_schedule(...) is
    # told where rmsjax keeps them, and that optax's own can be passed
    with pytest.raises(AttributeError, match=r"rmsjax\.schedules \(rmsjax\.schedules\.linear_"):
        rj.linear_schedule  # noqa: B018
    with pytest.raises(AttributeError, match=r"optax\.polynomial_schedule\(\.\.\.\) can be passed"):
        rj.polynomial_schedule  # noqa: B018
    params = {"w": jnp.ones(3)}
    schedule = optax.polynomial_schedule(0.1, 0.01, 2.0, 5)
    ours, theirs = rj.rmsprop(schedule), optax.rmsprop(schedule)
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(4):
        u1, s1 = jax.jit(ours.update)(params, s1, params)
        u2, s2 = jax.jit(theirs.update)(params, s2, params)
    _assert_same_bits(u1, u2)


def test_scale_by_learning_rate_of_none_scales_by_nothing_as_optax():
    g = {"w": jnp.array([2.0, -3.0])}
    for flip_sign in (True, False):
        ours = rj.scale_by_learning_rate(flip_sign=flip_sign)
        theirs = optax.scale_by_learning_rate(None, flip_sign=flip_sign)
        u1, _ = ours.update(g, ours.init(g))
        u2, _ = theirs.update(g, theirs.init(g))
        _assert_same_bits(u1, u2)
        np.testing.assert_array_equal(u1["w"], g["w"])


def test_global_norm_takes_optax_keyword():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
    assert float(rj.global_norm(updates=tree)) == float(optax.global_norm(updates=tree)) == 5.0


@pytest.mark.parametrize("module", [rj, rj.compat, rj.schedules])
def test_the_public_namespace_is_what_all_lists(module):
    # nothing the package imports for itself (importlib's helpers) leaks into `rj.`
    public = {name for name in dir(module) if not name.startswith("_")}
    assert public == set(module.__all__) - {"__version__"}
