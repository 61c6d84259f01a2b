"""Bad input gets a clear error; traced hyperparameters pass unchecked."""

from __future__ import annotations

import ast
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj

DOCS = pathlib.Path(__file__).parent.parent / "docs" / "validation.md"

# How to call each function with its other arguments valid.
CALLS = {
    "rmsprop": lambda **kw: rj.rmsprop(**{"learning_rate": 0.1, **kw}),
    "adagrad": lambda **kw: rj.adagrad(**{"learning_rate": 0.1, **kw}),
    "sgd": lambda **kw: rj.sgd(**{"learning_rate": 0.1, **kw}),
    "scale_by_rms": rj.scale_by_rms,
    "scale_by_rss": rj.scale_by_rss,
    "trace": rj.trace,
    "ema": lambda **kw: rj.ema(**{"decay": 0.9, **kw}),
    "scale": rj.scale,
    "scale_by_learning_rate": rj.scale_by_learning_rate,
    "add_decayed_weights": rj.add_decayed_weights,
    "schedules.linear_schedule": lambda **kw: rj.schedules.linear_schedule(
        **{"init_value": 1.0, "end_value": 0.0, "transition_steps": 10, **kw}
    ),
    "schedules.exponential_decay": lambda **kw: rj.schedules.exponential_decay(
        **{"init_value": 1.0, "transition_steps": 10, "decay_rate": 0.5, **kw}
    ),
    "schedules.cosine_decay_schedule": lambda **kw: rj.schedules.cosine_decay_schedule(
        **{"init_value": 1.0, "decay_steps": 10, **kw}
    ),
    "clip": rj.clip,
    "clip_by_global_norm": rj.clip_by_global_norm,
    "accumulate_gradients": lambda **kw: rj.accumulate_gradients(rj.sgd(0.1), **kw),
    "apply_if_finite": lambda **kw: rj.apply_if_finite(rj.sgd(0.1), **kw),
    "factored_rmsprop": lambda **kw: rj.factored_rmsprop(**{"learning_rate": 0.1, **kw}),
    "scale_by_factored_rmsprop": rj.scale_by_factored_rmsprop,
    "rowwise_adagrad": lambda **kw: rj.rowwise_adagrad(**{"learning_rate": 0.1, **kw}),
    "scale_by_rowwise_rss": rj.scale_by_rowwise_rss,
    "schedules.warmup_cosine_decay_schedule": lambda **kw: (
        rj.schedules.warmup_cosine_decay_schedule(
            **{"init_value": 0.0, "peak_value": 1.0, "warmup_steps": 2, "decay_steps": 10, **kw}
        )
    ),
    "schedules.constant_schedule": rj.schedules.constant_schedule,
    "compat.decoupled_weight_decay": lambda **kw: rj.compat.decoupled_weight_decay(
        **{"weight_decay": 0.1, "learning_rate": 0.1, **kw}
    ),
    "compat.inverse_time_decay": lambda **kw: rj.compat.inverse_time_decay(
        **{"learning_rate": 0.1, "lr_decay": 0.1, **kw}
    ),
    "grouped": lambda **kw: rj.grouped(rj.rmsprop(0.1), **kw),
    "auto_block_size": rj.auto_block_size,
    "compat.torch_rmsprop": rj.compat.torch_rmsprop,
    "compat.torch_adagrad": rj.compat.torch_adagrad,
    "compat.keras_rmsprop": rj.compat.keras_rmsprop,
    "compat.keras_adagrad": rj.compat.keras_adagrad,
    "compat.tf1_rmsprop": lambda **kw: rj.compat.tf1_rmsprop(**{"learning_rate": 0.1, **kw}),
    "compat.tf1_adagrad": lambda **kw: rj.compat.tf1_adagrad(**{"learning_rate": 0.1, **kw}),
}


def table_rows():
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in CALLS:
            rows.append(tuple(cells))
    return rows


ROWS = table_rows()


def test_the_docs_table_is_read():
    assert len(ROWS) >= 40


@pytest.mark.parametrize("function,argument,allowed,example", ROWS)
def test_each_documented_range_is_enforced(function, argument, allowed, example):
    value = float("inf") if example == "inf" else ast.literal_eval(example)
    # a flag given anything but True or False has the wrong type; a number a wrong value
    flag = allowed == "True or False"
    with pytest.raises(TypeError if flag else ValueError) as error:
        CALLS[function](**{argument: value})
    kind = f" ({type(value).__name__})" if flag else ""
    assert str(error.value) == (
        f"rmsjax.{function}: {argument} must be {allowed}, got {value!r}{kind}"
    )


@pytest.mark.parametrize("function,argument,allowed,example", ROWS)
def test_nan_is_rejected_wherever_a_number_is_checked(function, argument, allowed, example):
    if allowed == "True or False":
        return
    error = TypeError if allowed.startswith("an integer") else ValueError  # a count: a float
    with pytest.raises(error, match=re.escape(f"rmsjax.{function}: {argument} must be")):
        CALLS[function](**{argument: float("nan")})


# Counts (steps, leaves, entries, errors): one check, validate.check_count, with a
# ValueError for any wrong value; the table says "an integer >= N" for each.

# Arguments for which None means "off" in the signature itself.
NONE_MEANS_OFF = {
    ("compat.keras_rmsprop", "weight_decay"),
    ("compat.keras_adagrad", "weight_decay"),
    ("rmsprop", "momentum"),
    ("sgd", "momentum"),
    ("scale_by_learning_rate", "learning_rate"),  # identity(), as in optax
    ("grouped", "block_size"),  # rj.auto_block_size picks it
}

BAD_VALUES = {
    "a bool": (True, TypeError),
    "a string": ("0.1", TypeError),
    "None": (None, TypeError),
    "a list": ([0.9], TypeError),
    "a complex number": (1 + 2j, TypeError),
    "an array of three": (np.array([1.5, 1.5, 1.5]), ValueError),
    "a jax array of two": (jnp.array([0.5, 0.5]), ValueError),
    "float32 overflow": (1e40, ValueError),
    "minus infinity": (float("-inf"), ValueError),
}


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize(
    "function,argument,integer",
    sorted(
        {
            (f, a, allowed.startswith("an integer"))
            for f, a, allowed, _ in ROWS
            if allowed != "True or False"
        }
    ),
)
def test_every_documented_argument_refuses_what_is_not_a_real_scalar(
    function, argument, integer, bad
):
    value, error_type = BAD_VALUES[bad]
    if integer and bad in ("float32 overflow", "minus infinity"):
        error_type = TypeError  # a count is an integer: any float is the wrong type
    if value is None and (function, argument) in NONE_MEANS_OFF:
        return
    with pytest.raises(error_type) as error:
        CALLS[function](**{argument: value})
    assert str(error.value).startswith(f"rmsjax.{function}: {argument} must be"), error.value
    assert repr(value) in str(error.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.sgd(0.1, accumulator_dtype=jnp.int32),
        lambda: rj.trace(0.9, accumulator_dtype="int8"),
        lambda: rj.ema(0.9, accumulator_dtype=jnp.bool_),
        lambda: rj.accumulate_gradients(rj.sgd(1.0), 2, accumulator_dtype=jnp.int32),
        # 8-bit floats were accepted and failed in the step with JAX's promotion error
        lambda: rj.sgd(0.1, 0.9, accumulator_dtype=jnp.float8_e4m3fn),
        lambda: rj.ema(0.9, accumulator_dtype="float8_e5m2"),
        lambda: rj.accumulate_gradients(rj.sgd(1.0), 2, accumulator_dtype=jnp.float8_e5m2),
    ],
)
def test_integer_and_8_bit_accumulator_dtypes_are_refused(make):
    # the dtype shown by its name (jnp.int32 showed as <class 'jax.numpy.int32'>)
    with pytest.raises(
        ValueError,
        match=r"accumulator_dtype must be None or a floating \(or complex\) dtype of 16 bits "
        r"or more, got (int8|bool|int32|float8_e4m3fn|float8_e5m2)$",
    ):
        make()


@pytest.mark.parametrize("value", [jnp.array([1.0]), np.float64(np.nan), 0.5])
def test_accumulator_dtype_must_be_a_dtype_not_a_value_that_has_one(value):
    with pytest.raises(TypeError, match="rmsjax.trace: accumulator_dtype must be None or a"):
        rj.trace(0.9, accumulator_dtype=value)


@pytest.mark.parametrize(
    "make", [lambda: rj.sgd(0.1, nesterov=True), lambda: rj.rmsprop(0.1, nesterov=True)]
)
def test_nesterov_without_momentum_is_refused(make):
    with pytest.raises(ValueError, match="nesterov=True needs a momentum, got momentum=None"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda s: rj.rmsprop(s),
        lambda s: rj.compat.torch_adagrad(lr=s, lr_decay=0.1),
        lambda s: rj.compat.keras_rmsprop(learning_rate=s, weight_decay=0.1),
        lambda s: rj.inject_hyperparams(rj.sgd)(learning_rate=s),
    ],
)
@pytest.mark.parametrize("shape", [(3,), (2,)])
def test_a_schedule_must_return_a_scalar(make, shape):
    params = jnp.ones(3)
    # at construction where the schedule is evaluated there, else when the step is traced
    # (torch's presets name their own argument, lr)
    with pytest.raises(ValueError, match=r"(learning_rate|the lr) schedule must return a scalar"):
        tx = make(lambda count: jnp.full(shape, 0.1))
        jax.jit(tx.update)(params, tx.init(params), params)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: rj.rmsprop(s),
        lambda s: rj.compat.torch_adagrad(lr=s, lr_decay=0.1),
        lambda s: rj.inject_hyperparams(rj.sgd)(learning_rate=s),
    ],
)
@pytest.mark.parametrize(
    "returned,shown",
    [
        (lambda count: None, r"None \(NoneType\)"),
        (lambda count: "0.1", r"'0\.1' \(str\)"),
        (lambda count: 0.1 + 0j, r"\(0\.1\+0j\) \(complex\)"),
        (lambda count: True, r"True \(bool\)"),  # stepped with a learning rate of 1
        (lambda count: count > 3, r"a value of dtype bool"),
    ],
)
def test_a_schedule_must_return_a_real_number(make, returned, shown):
    # each failed inside the step with Python's own error (or stepped as 1), unnamed
    params = jnp.ones(3)
    with pytest.raises(
        TypeError,
        match=r"(learning_rate|the lr) schedule must return a real number \(an integer or a "
        rf"float\), got {shown}",
    ):
        tx = make(returned)
        jax.jit(tx.update)(params, tx.init(params), params)


def test_inject_hyperparams_says_where_a_function_that_is_no_schedule_goes():
    # optax calls every callable argument with the count: adamw's mask function returned
    # False there and masked every parameter out of the weight decay, in silence
    mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    with pytest.raises(
        TypeError, match=r"got False \(bool\); a function that is no schedule "
    ) as refusal:
        rj.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.1, mask=mask)
    # one traceback: the refusal was shown twice ("During handling of the above ...")
    assert refusal.value.__suppress_context__ or refusal.value.__context__ is None
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    theirs = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.1, weight_decay=0.1, mask=mask
    )
    ours = rj.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.1, weight_decay=0.1, mask=mask
    )
    want = theirs.update(params, theirs.init(params), params)[0]
    got = ours.update(params, ours.init(params), params)[0]
    for key in params:
        np.testing.assert_array_equal(got[key], want[key])


def test_traced_hyperparameters_pass_unchecked_and_work():
    params = jnp.array([1.0, -1.0])
    grads = jnp.array([0.5, 2.0])

    @jax.jit
    def one_step(lr, decay):
        tx = rj.rmsprop(lr, decay=decay, momentum=0.9)
        return rj.update_and_apply(tx, grads, tx.init(params), params)[0]

    got = one_step(jnp.float32(0.1), jnp.float32(0.5))
    want = params - 0.1 * grads / np.sqrt(0.5 * grads**2 + 1e-8)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # and through vmap over learning rates (meta-learning sweeps)
    sweep = jax.vmap(one_step, in_axes=(0, None))(jnp.array([0.1, 0.2]), jnp.float32(0.5))
    np.testing.assert_allclose(sweep[1] - params, 2 * (want - params), rtol=1e-5)


def test_structure_mismatch_shows_both_structures():
    tx = rj.rmsprop(0.1)
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(3)})
    with pytest.raises(ValueError) as error:
        jax.jit(tx.update)({"a": jnp.ones(2)}, state)
    message = str(error.value)
    assert "tree structure of the updates differs" in message
    assert "updates: PyTreeDef({'a': *})" in message
    assert "state: PyTreeDef({'a': *, 'b': *})" in message


def test_params_or_state_deeper_than_the_updates_show_both_structures():
    # a dict where the updates hold an array: flatten_up_to takes it, and the step then
    # failed inside jnp.asarray ("entry not a 2- or 3- tuple")
    tx = rj.rmsprop(0.1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"differs from that of the parameters") as error:
        rj.update_and_apply(tx, params, state, {"w": {"x": jnp.ones(3)}})
    assert "parameters: PyTreeDef({'w': {'x': *}})" in str(error.value)
    bad = (state[0]._replace(nu={"w": {"x": jnp.ones(3)}}),) + tuple(state[1:])
    with pytest.raises(ValueError, match=r"differs from that of the state"):
        tx.update(params, bad, params)
    with pytest.raises(ValueError, match=r"^rmsjax\.group_state: the state's tree structure"):
        rj.group_state(rj.grouped(tx), bad, params)
    # an int8 slot is one array of the state, not a subtree
    tx8 = rj.rmsprop(0.1, storage="int8")
    big = {"w": jnp.ones(5000)}
    updates, _ = tx8.update(big, tx8.init(big), big)
    assert updates["w"].shape == (5000,)


def test_shape_mismatch_names_the_leaf():
    tx = rj.adagrad(0.1)
    state = tx.init({"layer": {"w": jnp.ones((3, 4))}})
    with pytest.raises(ValueError) as error:
        jax.jit(tx.update)({"layer": {"w": jnp.ones((4, 3))}}, state)
    assert "['layer']['w'] has shape (4, 3) but the state holds (3, 4)" in str(error.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_boolean_parameters_are_refused_with_advice(dtype):
    with pytest.raises(TypeError) as error:
        rj.rmsprop(0.1).init({"w": jnp.ones(2), "steps": jnp.zeros(3, dtype)})
    message = str(error.value)
    assert "['steps']" in message and str(jnp.dtype(dtype)) in message
    assert "None" in message and "eqx.filter" in message


def test_state_of_another_optimizer_is_refused():
    params = jnp.ones(2)
    with pytest.raises(TypeError, match="expected a ScaleByRssState .* got ScaleByRmsState"):
        rj.scale_by_rss().update(params, rj.scale_by_rms().init(params))
    with pytest.raises(TypeError, match="expected the tuple of 2 states"):
        rj.adagrad(0.1).update(params, rj.rmsprop(0.1, momentum=0.9).init(params))


def test_a_state_made_with_other_options_is_refused_in_both_directions():
    # a centered mean handed to an uncentered rule was dropped from the new state in
    # silence (the reverse was refused)
    params = {"w": jnp.ones(4096), "b": jnp.zeros(2)}
    grads = jax.tree.map(jnp.ones_like, params)
    pairs = [
        (
            rj.rmsprop(0.1, momentum=0.9),
            rj.rmsprop(0.1, momentum=0.9, centered=True),
            "mu holds arrays",
        ),
        (rj.rmsprop(0.1, centered=True), rj.rmsprop(0.1), "mu is None"),
    ]
    for tx, other, says in pairs:
        state = other.init(params)
        before = jax.tree.map(np.asarray, state)
        for update in (tx.update, jax.jit(tx.update)):
            with pytest.raises(TypeError, match=rf"^rmsjax\.(rmsprop|adagrad)\.update: .*{says}"):
                update(grads, state, params)
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), before)


def test_params_required_where_needed():
    tx = rj.chain(rj.add_decayed_weights(1e-4), rj.sgd(0.1))
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


@pytest.mark.parametrize(
    "name,make",
    [
        ("rmsprop", lambda: rj.rmsprop(0.1, momentum=0.9)),
        ("adagrad", lambda: rj.adagrad(0.1)),
        ("sgd", lambda: rj.sgd(0.1, momentum=0.9)),
        ("rowwise_adagrad", lambda: rj.rowwise_adagrad(0.1)),
        ("factored_rmsprop", lambda: rj.factored_rmsprop(0.1)),
        ("compat.torch_rmsprop", lambda: rj.compat.torch_rmsprop(lr=0.1)),
        ("compat.keras_adagrad", lambda: rj.compat.keras_adagrad()),
        ("compat.tf1_rmsprop", lambda: rj.compat.tf1_rmsprop(learning_rate=0.1)),
    ],
)
def test_errors_name_the_constructor_the_user_called(name, make):
    tx = make()
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=rf"^rmsjax\.{re.escape(name)}\.update: "):
        jax.jit(tx.update)({"a": jnp.ones(3)}, state)
    with pytest.raises(TypeError, match=rf"^rmsjax\.{re.escape(name)}\.update: expected the tuple"):
        tx.update({"w": jnp.ones(3)}, (rj.EmptyState(),))


def _foreign_part(state, index, value=5):
    return tuple(value if i == index else s for i, s in enumerate(state))


@pytest.mark.parametrize(
    "build, state_of, expected",
    [
        (
            lambda: rj.rmsprop(0.1, centered=True),
            lambda p: rj.rmsprop(0.1).init(p),
            r"^rmsjax\.rmsprop\.update: its part scale_by_rms \(state\[0\]\): the state's mu "
            r"is None",
        ),
        (
            lambda: rj.adagrad(0.1),
            lambda p: _foreign_part(rj.adagrad(0.1).init(p), 1),
            r"^rmsjax\.adagrad\.update: its part scale_by_learning_rate \(state\[1\]\): "
            r"expected a ScaleByLearningRateState",
        ),
        (
            lambda: rj.chain(rj.clip_by_global_norm(1.0), rj.scale_by_rms(), rj.trace(0.9)),
            lambda p: _foreign_part(
                rj.chain(rj.clip_by_global_norm(1.0), rj.scale_by_rms(), rj.trace(0.9)).init(p),
                2,
            ),
            r"^rmsjax\.chain\.update: its part trace \(state\[2\]\): expected a TraceState",
        ),
        (
            lambda: rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(0.1, centered=True)),
            lambda p: (rj.EmptyState(), rj.rmsprop(0.1).init(p)),
            r"^rmsjax\.chain\.update: its part rmsprop \(state\[1\]\): its part scale_by_rms "
            r"\(state\[0\]\)",
        ),
        (
            lambda: rj.compat.torch_rmsprop(lr=0.1, momentum=0.9),
            lambda p: _foreign_part(rj.compat.torch_rmsprop(lr=0.1, momentum=0.9).init(p), 4),
            r"^rmsjax\.compat\.torch_rmsprop\.update: its part scale_by_learning_rate "
            r"\(state\[4\]\)",
        ),
        (
            # grouped runs its rule in another layout: its errors carry its own name
            lambda: rj.chain(rj.clip_by_global_norm(1.0), rj.grouped(rj.rmsprop(0.1))),
            lambda p: rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(0.1)).init(p),
            r"^rmsjax\.chain\.update: its part grouped \(state\[1\]\): expected the "
            r"GroupedState that init returned, got tuple",
        ),
    ],
    ids=["rmsprop-centered", "adagrad", "chain", "nested", "torch-preset", "grouped-part"],
)
def test_a_part_at_fault_is_named_after_the_constructor_the_user_called(build, state_of, expected):
    params = jnp.ones(3)
    with pytest.raises(TypeError, match=expected):
        build().update(params, state_of(params), params)


def test_a_grouped_part_names_the_chain_then_itself_for_a_gradient_of_another_shape():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    tx = rj.chain(rj.clip_by_global_norm(1.0), rj.grouped(rj.rmsprop(0.1)))
    state = tx.init(params)
    grads = {"w": jnp.ones((3, 4)), "b": jnp.ones(3)}
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.chain\.update: its part grouped \(state\[1\]\): the update at "
        r"\['w'\] has shape \(3, 4\)",
    ):
        tx.update(grads, state, params)
    # a wrapper that grouped cannot hold is named, with where it goes instead
    with pytest.raises(TypeError, match=r"holds rmsjax\.apply_if_finite\. .* wrap apply_if_finite"):
        rj.grouped(rj.apply_if_finite(rj.rmsprop(0.1), 2))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: rj.quantize(jnp.ones(4096, jnp.complex64), signed=True),
            TypeError,
            r"^rmsjax\.quantize: x must be an array of real numbers \(floating, integer or "
            r"bool\), got an array of dtype complex64$",
        ),
        (
            lambda: rj.quantize(["a", "b"], signed=False),
            TypeError,
            r"^rmsjax\.quantize: x must be an array of real numbers .* got an array of dtype str",
        ),
        (
            lambda: rj.quantize(jnp.ones(4096), signed="no"),
            TypeError,
            r"^rmsjax\.quantize: signed must be True or False, got 'no' \(str\)$",
        ),
        (
            lambda: rj.dequantize(jnp.ones(3)),
            TypeError,
            r"^rmsjax\.dequantize: q must be a QuantizedArray, got Array\(.*\(ArrayImpl\)$",
        ),
    ],
    ids=["complex", "strings", "signed-not-bool", "not-quantized"],
)
def test_quantize_and_dequantize_refuse_what_they_cannot_hold(call, error, message):
    # a complex array would lose its imaginary part, a truthy string would pass for True
    with pytest.raises(error, match=message):
        call()


def test_quantize_takes_real_arrays_of_any_kind():
    # values within 2x of their block's largest: within 3.1% (docs/memory.md)
    kinds = ([1.5, -2.0], 3.0, jnp.arange(200, 300), np.ones(300, bool), jnp.ones(9, jnp.bfloat16))
    for x in kinds:
        got = np.asarray(rj.dequantize(rj.quantize(x, signed=True)), np.float64)
        np.testing.assert_allclose(got, np.asarray(x, np.float64), rtol=2.0**-5)


@pytest.mark.parametrize(
    "function, argument, call",
    [
        ("chain", r"transforms\[1\]", lambda bad: rj.chain(rj.sgd(0.1), bad)),
        ("update_and_apply", "tx", lambda bad: rj.update_and_apply(bad, {}, (), {})),
        ("make_train_step", "tx", lambda bad: rj.make_train_step(lambda p: 0.0, bad)),
        ("grouped", "tx", lambda bad: rj.grouped(bad)),
        ("apply_if_finite", "inner", lambda bad: rj.apply_if_finite(bad, 3)),
        ("accumulate_gradients", "inner", lambda bad: rj.accumulate_gradients(bad, 2)),
        ("masked", "inner", lambda bad: rj.masked(bad, {"w": True})),
        ("as_optax", "tx", lambda bad: rj.as_optax(bad)),
        ("with_extra_args_support", "tx", lambda bad: rj.with_extra_args_support(bad)),
        ("state_shardings", "tx", lambda bad: rj.state_shardings(bad, {})),
        (
            "zero1_update_and_apply",
            "tx",
            lambda bad: rj.zero1_update_and_apply(bad, {}, (), {}, None),
        ),
    ],
)
@pytest.mark.parametrize("bad", [3, "rmsprop", rj.rmsprop], ids=["int", "str", "factory"])
def test_wrappers_refuse_what_is_not_a_transformation(function, argument, call, bad):
    # the factory itself (rj.rmsprop, not rj.rmsprop(...)) is the usual slip
    with pytest.raises(
        TypeError,
        match=rf"^rmsjax\.{function}: {argument} must be a GradientTransformation \(with init "
        rf"and update, from rmsjax or optax\), got .* \({type(bad).__name__}\)$",
    ):
        call(bad)


def test_make_train_step_needs_a_callable_loss():
    with pytest.raises(TypeError, match=r"^rmsjax\.make_train_step: loss_fn must be callable"):
        rj.make_train_step(3.0, rj.sgd(0.1))


@pytest.mark.parametrize(
    "loss_fn,has_aux,says",
    [
        (
            lambda p: (jnp.sum(p), 2.0),
            False,
            "got a tuple of length 2; if it returns .loss, aux., pass has_aux=True",
        ),
        (
            lambda p: jnp.sum(p),
            True,
            r"with has_aux=True, loss_fn must return \(loss, aux\), got an array of shape \(\)",
        ),
        (lambda p: p * 2.0, False, r"must return a scalar loss, got an array of shape \(3,\)"),
        (lambda p: (p, {}), True, r"must return a scalar loss, got an array of shape \(3,\)"),
        (
            lambda p: (jnp.sum(p), {"tag": "train", "n": 3}),
            True,
            r"aux .* must be arrays or numbers; got str 'train' at aux\['tag'\]",
        ),
        (  # a NumPy string passed for a number
            lambda p: (jnp.sum(p), [np.str_("train")]),
            True,
            r"got an array of shape \(\) and dtype <U5 at aux\[0\]",
        ),
    ],
)
def test_make_train_step_names_what_loss_fn_returned(loss_fn, has_aux, says):
    params = jnp.ones(3)
    tx = rj.sgd(0.1)
    state = tx.init(params)
    step = rj.make_train_step(loss_fn, tx, has_aux=has_aux)
    with pytest.raises(TypeError, match=r"^rmsjax\.make_train_step: .*" + says):
        step(params, state)
    # refused while tracing: the donated arrays were never used
    np.testing.assert_array_equal(params, jnp.ones(3))


@pytest.mark.parametrize("argument", ["has_aux", "donate"])
def test_make_train_step_flags_are_bools(argument):
    with pytest.raises(
        TypeError, match=rf"^rmsjax\.make_train_step: {argument} must be True or False, got 'yes'"
    ):
        rj.make_train_step(lambda p: 0.0, rj.sgd(0.1), **{argument: "yes"})


def test_inject_hyperparams_names_the_factory_on_a_wrong_argument():
    with pytest.raises(
        TypeError,
        match=r"^rmsjax\.inject_hyperparams\(rmsprop\): got an unexpected keyword argument "
        r"'lr'; its arguments are \['learning_rate', 'decay'",
    ):
        rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, lr=0.1)


def _first_line_of_error(call):
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value).splitlines()[0]


def test_structure_errors_name_the_first_key_path_where_the_trees_differ():
    # a model of many leaves prints two long PyTreeDefs; the message says where they part
    params = {"enc": {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, "dec": [jnp.ones(2), jnp.ones(2)]}
    grads = {"enc": {"w": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "dec": [jnp.ones(2), jnp.ones(2)]}
    short = {"enc": {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, "dec": [jnp.ones(2)]}
    holed = {"enc": {"w": jnp.ones((4, 3)), "b": None}, "dec": [jnp.ones(2), jnp.ones(2)]}

    def keys(has_b, has_bias):
        return ("at ['enc']: ", f"['b'] only in the {has_b}", f"['bias'] only in the {has_bias}")

    tx, grouped = rj.rmsprop(0.1), rj.grouped(rj.rmsprop(0.1))
    state, grouped_state = tx.init(params), grouped.init(params)
    cases = [
        (lambda: tx.update(grads, state, params), keys("state", "updates")),
        (lambda: tx.update(short, state, params), "at ['dec']: [1] only in the state"),
        (
            lambda: tx.update(holed, state, params),
            "at ['enc']['b']: None in the updates, a leaf of shape (3,) in the state",
        ),
        (lambda: rj.apply_updates(params, grads), keys("params", "updates")),
        (
            lambda: grouped.update(grads, grouped_state, params),
            keys("parameters", "updates"),
        ),
        (
            lambda: rj.ungroup_state(grouped, grouped_state, short),
            "at ['dec']: [1] only in the parameters",
        ),
        (
            lambda: rj.group_state(grouped, tx.init(short), params),
            "at ['dec']: [1] only in the params",
        ),
        (
            lambda: rj.masked(tx, {"enc": True, "dec": (True, False)}).init(params),
            "at ['dec']: a tuple in the mask, a list in the parameters",
        ),
        (
            lambda: rj.accumulate_gradients(tx, 2).update(
                short, rj.accumulate_gradients(tx, 2).init(params)
            ),
            "at ['dec']: [1] only in the state",
        ),
    ]
    for call, where in cases:
        line = _first_line_of_error(call)
        for part in (where,) if isinstance(where, str) else where:
            assert part in line, (part, line)


def test_a_leaf_at_the_root_is_named_root_not_left_blank():
    tx = rj.rmsprop(1e-3)
    with pytest.raises(TypeError, match=r"params leaf <root> has dtype int32"):
        rj.effective_step_sizes(tx, tx.init(jnp.ones(3)), jnp.arange(3))
    with pytest.raises(ValueError, match=r"the update at <root> has shape \(2,\)"):
        rj.apply_updates(jnp.ones(3), jnp.ones(2))


def test_apply_updates_refuses_updates_that_do_not_fit_the_parameters():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4), "frozen": None}
    with pytest.raises(ValueError, match=r"^rmsjax\.apply_updates: the tree structure of the"):
        rj.apply_updates(params, {"w": jnp.ones((4, 4))})
    # updates whose tree goes on below a parameter (a dict or tuple where it is an array)
    deeper = {"w": {"x": jnp.ones((4, 4))}, "b": jnp.ones(4), "frozen": None}
    with pytest.raises(ValueError, match=r"the tree structure of the updates differs"):
        rj.apply_updates(params, deeper)
    with pytest.raises(ValueError, match=r"the tree structure of the updates differs"):
        rj.apply_updates(jnp.ones(3), (jnp.ones(3),))
    # an update that would fail to add, or would silently change the parameter's shape
    for bad, shape in [(jnp.ones(3), r"\(3,\)"), (jnp.ones((2, 4)), r"\(2, 4\)")]:
        with pytest.raises(
            ValueError,
            match=rf"^rmsjax\.apply_updates: the update at \['b'\] has shape {shape}, which "
            r"does not fit its parameter's shape \(4,\)",
        ):
            jax.jit(rj.apply_updates)(params, {"w": jnp.ones((4, 4)), "b": bad, "frozen": None})
    # what fits is added: same shapes, or updates that broadcast to the parameter's
    out = rj.apply_updates(params, {"w": 0.5, "b": jnp.full(4, 2.0), "frozen": None})
    np.testing.assert_array_equal(out["w"], np.full((4, 4), 1.5))
    np.testing.assert_array_equal(out["b"], np.full(4, 3.0))
    assert out["frozen"] is None


# ------------------------------------------------------------------- helpers' arguments


@pytest.mark.parametrize(
    "bad,error",
    [(-1, ValueError), (0, ValueError), (1.5, TypeError), (True, TypeError), ("8", TypeError)],
)
def test_block_counts_are_positive_integers(bad, error):
    with pytest.raises(error, match=r"^rmsjax\.auto_block_size: count must be an integer >= 1"):
        rj.auto_block_size(bad)
    for argument in ("block_size", "max_stacked_size"):
        with pytest.raises(
            error, match=rf"^rmsjax\.leaf_blocks: {argument} must be an integer >= 1"
        ):
            rj.leaf_blocks([jnp.zeros(3)], **{argument: bad})
    assert rj.auto_block_size(np.int64(300)) == rj.auto_block_size(300) == 16


def test_leaf_blocks_names_a_leaf_that_is_not_an_array():
    # a string leaf was read by jnp.result_type as the name of a dtype
    with pytest.raises(
        TypeError, match=r"^rmsjax\.leaf_blocks: params leaf \['name'\] is 'abc' \(str\)"
    ):
        rj.leaf_blocks({"w": jnp.ones(3), "name": "abc"})
    # numbers and shape-dtype structs are leaves it reads
    assert rj.leaf_blocks(
        [jnp.ones(3), 1.0, jax.ShapeDtypeStruct((3,), jnp.float32)], block_size=8
    ) == ((0, 2), (1,))


def test_counts_take_numpy_integers_and_refuse_bools():
    # one check for every count: a NumPy integer (from a config array, say) is a count,
    # a bool is not, whatever its integer value
    params = {"w": jnp.ones((2, 3))}
    grads = {"w": jnp.full((2, 3), 0.5)}
    for make in (
        lambda n: rj.accumulate_gradients(rj.sgd(0.1), every_k=n),
        lambda n: rj.apply_if_finite(rj.sgd(0.1), max_consecutive_errors=n),
        lambda n: rj.factored_rmsprop(0.1, min_dim_size_to_factor=n),
        lambda n: rj.grouped(rj.rmsprop(0.1), block_size=n),
    ):
        plain, numpy_count = make(2), make(np.int64(2))
        expected, _ = plain.update(grads, plain.init(params), params)
        got, _ = numpy_count.update(grads, numpy_count.init(params), params)
        np.testing.assert_array_equal(got["w"], expected["w"])
        with pytest.raises(TypeError, match=r"must be an integer >= \d.*, got True \(bool\)"):
            make(True)


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: rj.sgd(lr),
        lambda lr: rj.rmsprop(lr, momentum=0.9),
        lambda lr: rj.adagrad(lr),
        lambda lr: rj.compat.torch_rmsprop(lr=lr),
        lambda lr: rj.rmsprop(lambda count: lr),  # a schedule's value
    ],
)
@pytest.mark.parametrize("kind", [np.uint8, np.uint32, np.int64, jnp.uint8, jnp.int32])
def test_an_integer_learning_rate_steps_as_its_float(make, kind):
    # negated for the step: -1 * np.uint8(2) raised, -1 * jnp.uint8(2) wrapped around to 254
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    grads = {"w": jnp.linspace(0.5, -2.0, 6).reshape(2, 3)}
    for jit in (False, True):
        got, expected = (
            (jax.jit(tx.update) if jit else tx.update)(grads, tx.init(params), params)[0]["w"]
            for tx in (make(kind(2)), make(2.0))
        )
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("function", [rj.effective_step_sizes, rj.step_size_summary])
def test_step_sizes_of_integer_parameters_name_the_leaf(function):
    tx = rj.rmsprop(0.1)
    state = tx.init({"w": jnp.ones(3), "n": jnp.ones(2)})
    with pytest.raises(
        TypeError, match=rf"^rmsjax\.{function.__name__}: params leaf \['n'\] has dtype int32"
    ):
        function(tx, state, {"w": jnp.ones(3), "n": jnp.ones(2, jnp.int32)})


def test_bytes_per_device_counts_device_arrays_only():
    # a state after optax.tree_utils.tree_set can hold a Python float; host arrays too
    tree = {"a": jnp.zeros(3), "b": 0.05, "c": np.zeros(100), "d": None}
    assert list(rj.bytes_per_device(tree).values()) == [12]


ZERO1_CALLS = {
    "zero1_shardings": lambda mesh, axis: rj.zero1_shardings(
        rj.sgd(0.1).init(jnp.ones(4)), mesh, axis
    ),
    "shard_state": lambda mesh, axis: rj.shard_state(rj.sgd(0.1).init(jnp.ones(4)), mesh, axis),
    "zero1_update_and_apply": lambda mesh, axis: rj.zero1_update_and_apply(
        rj.sgd(0.1), jnp.ones(4), rj.sgd(0.1).init(jnp.ones(4)), jnp.ones(4), mesh, axis
    ),
}


@pytest.mark.parametrize("function", ZERO1_CALLS)
def test_zero1_helpers_name_themselves_for_a_bad_mesh_or_axis(function):
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(
        ValueError,
        match=rf"^rmsjax\.{function}: axis must be one of the mesh's axes \('data',\), got 'model'",
    ):
        ZERO1_CALLS[function](mesh, "model")
    with pytest.raises(
        TypeError,
        match=rf"^rmsjax\.{function}: mesh must be a jax.sharding.Mesh, got 'data' \(str\)",
    ):
        ZERO1_CALLS[function]("data", "data")


def test_grouping_helpers_name_themselves_and_the_mismatch():
    params = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(5)}
    tx = rj.grouped(rj.rmsprop(0.1, momentum=0.9))
    grouped_state, per_leaf = tx.init(params), rj.rmsprop(0.1, momentum=0.9).init(params)
    with pytest.raises(
        ValueError, match=r"^rmsjax\.ungroup_state: the tree structure of the params differs"
    ):
        rj.ungroup_state(tx, grouped_state, {"a": jnp.ones(3)})
    unchecked = grouped_state._replace(structure=None)  # a state that does not say its tree
    with pytest.raises(
        ValueError, match=r"^rmsjax\.ungroup_state: the state holds 2 blocks, and params"
    ):
        rj.ungroup_state(tx, unchecked, {"a": jnp.ones(3)})
    wider = {"a": jnp.ones(4), "b": jnp.ones(4), "c": jnp.ones(5)}
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.ungroup_state: params at \['a'\] has shape \(4,\) but the "
        r"parameter the state was made for has \(3,\)",
    ):
        rj.ungroup_state(tx, grouped_state, wider)
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.ungroup_state: the state's nu for the block of leaves \(0, 1\) has "
        r"shape \(2, 3\), and params make it \(2, 4\)",
    ):
        rj.ungroup_state(tx, unchecked, wider)
    with pytest.raises(TypeError, match=r"^rmsjax\.ungroup_state: expected the GroupedState"):
        rj.ungroup_state(tx, per_leaf, params)
    with pytest.raises(TypeError, match=r"^rmsjax\.group_state: state is a GroupedState already"):
        rj.group_state(tx, grouped_state, params)
    with pytest.raises(ValueError, match=r"^rmsjax\.group_state: the state's tree structure"):
        rj.group_state(tx, per_leaf, {"a": jnp.ones(3)})


def test_hyperparameters_take_every_real_scalar_optax_takes():
    # a bfloat16 scalar (NumPy calls its kind 'V') and a Python int beyond int64 (an
    # object array to NumPy) were refused as "not a real number"
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([0.5, -1.0, 2.0])}
    reference, _ = rj.sgd(0.125).update(grads, rj.sgd(0.125).init(params))
    for value in (jnp.bfloat16(0.125), jnp.asarray(0.125, jnp.bfloat16), np.float16(0.125)):
        tx = rj.sgd(value)
        np.testing.assert_array_equal(tx.update(grads, tx.init(params))[0]["w"], reference["w"])
    # a Python int beyond int64 (an object array to NumPy) is a number too; where a
    # rule converts it, it steps as optax's does
    p = {"w": jnp.ones(3)}
    for tx in (rj.clip(10**10), rj.adagrad(0.1, initial_accumulator_value=10**10), rj.sgd(2**31)):
        assert bool(jnp.isfinite(tx.update(p, tx.init(p), p)[0]["w"]).all())
    rj.rmsprop(2**100)  # 1.3e30: finite in float32
    for huge in (2**200, 2**2000):  # beyond float32 (and float64): refused as such
        with pytest.raises(
            ValueError,
            match=r"^rmsjax\.rmsprop: learning_rate must be finite in float32 \(at most",
        ):
            rj.rmsprop(huge)
    # and stepped: a Python int beyond int32 raised an OverflowError in the first step
    tx = rj.rmsprop(2**40, eps=2**31)
    assert bool(jnp.isfinite(tx.update(p, tx.init(p), p)[0]["w"]).all())


def test_a_leaf_that_is_not_an_array_is_named():
    # jnp.asarray's own error ("Value 'abc' with dtype <U3 is not a valid JAX array
    # type") named neither the optimizer nor the leaf
    for tx, name in (
        (rj.rmsprop(0.1), "rmsprop"),
        (rj.chain(rj.clip(1.0), rj.adagrad(0.1)), "chain"),
    ):
        with pytest.raises(
            TypeError, match=rf"^rmsjax\.{name}\.init: leaf \['name'\] is 'abc' \(str\)"
        ):
            tx.init({"w": jnp.ones(3), "name": "abc"})
        state = tx.init({"w": jnp.ones(3), "name": None})
        with pytest.raises(TypeError, match=rf"^rmsjax\.{name}\.update: leaf \['name'\] is 'abc'"):
            tx.update({"w": jnp.ones(3), "name": "abc"}, state)


def test_make_train_step_names_an_integer_parameter_and_deletes_nothing():
    tx = rj.rmsprop(0.1)
    step = rj.make_train_step(lambda p, x: jnp.sum(p["w"] * x), tx)
    params = {"w": jnp.ones(3), "n": jnp.array(3)}
    state = tx.init({"w": jnp.ones(3), "n": None})
    with pytest.raises(
        TypeError, match=r"^rmsjax\.make_train_step: params leaf \['n'\] has dtype int32"
    ):
        step(params, state, jnp.ones(3))
    np.testing.assert_array_equal(params["w"], np.ones(3))  # not donated: still readable
    np.testing.assert_array_equal(state[0].nu["w"], np.zeros(3))


def test_a_count_the_rule_does_not_keep_is_dropped_as_before():
    # optax.tree_utils.tree_set(state, count=...) fills every count field, also the
    # None count of an Adagrad state that keeps none: the step takes it, as it did
    params = {"w": jnp.ones(3)}
    for tx in (rj.adagrad(0.1), rj.compat.torch_adagrad(), rj.grouped(rj.adagrad(0.1))):
        state = tx.init(params)
        reset = optax.tree_utils.tree_set(state, count=jnp.zeros([], jnp.int32))
        expected, _ = tx.update(params, state, params)
        got, _ = tx.update(params, reset, params)
        np.testing.assert_array_equal(got["w"], expected["w"])
    # an int8 state handed to a bfloat16 Adagrad, which counts its steps too, steps in
    # the storage it holds
    big = {"w": jnp.ones(4096)}
    int8_state = rj.adagrad(0.1, storage="int8").init(big)
    updates, new_state = rj.adagrad(0.1, storage="bfloat16").update(big, int8_state, big)
    assert isinstance(new_state[0].sum_of_squares["w"], rj.QuantizedArray)
    assert bool(jnp.isfinite(updates["w"]).all())


@pytest.mark.parametrize(
    "made, stepped, field",
    [
        # a default Adagrad dropped the count that salts the codes' rounding: the sum
        # stopped near 60 of 2000 after 2000 steps of a gradient of 1
        ({"storage": "int8"}, {}, "sum_of_squares"),
        ({"storage": "int8"}, {"storage": "float32"}, "sum_of_squares"),
        ({"storage": "int8"}, "grouped", "sum_of_squares"),
        # rounded to nearest: an RMSprop average at a decay of 0.999 stopped at a quarter
        ({"storage": "bfloat16"}, {"storage": "float32"}, "nu"),
        ({"storage": "bfloat16"}, {"storage": "int8"}, "nu"),
        ({"storage": "bfloat16"}, {"storage": "int8"}, "sum_of_squares"),
    ],
)
def test_a_state_another_storage_made_is_refused_where_it_would_round_otherwise(
    made, stepped, field
):
    params = {"w": jnp.ones(4096)}
    make = rj.adagrad if field == "sum_of_squares" else rj.rmsprop
    if stepped == "grouped":
        maker, stepper = rj.grouped(make(0.1, **made)), rj.grouped(make(0.1))
    else:
        maker, stepper = make(0.1, **made), make(0.1, **stepped)
    state = maker.init(params)
    held = "8-bit blocks" if made["storage"] == "int8" else "bfloat16"
    with pytest.raises(
        TypeError,
        match=rf"the state's {field} is held in {held} \(made with storage='{made['storage']}'",
    ):
        jax.jit(stepper.update)(params, state, params)
    # the optimizer that made it steps it
    jax.jit(maker.update)(params, state, params)


def test_a_bfloat16_parameter_s_own_state_cast_to_float32_steps_under_storage_float32():
    # the refusal names both makers of a bfloat16 moment, and its advice works
    params = {"w": jnp.ones((64, 128), jnp.bfloat16)}
    state = rj.rmsprop(1e-2).init(params)
    tx = rj.rmsprop(1e-2, storage="float32")
    with pytest.raises(TypeError, match=r"or with storage=None for bfloat16 parameters\)"):
        tx.update(params, state, params)
    cast = state[0]._replace(nu=jax.tree.map(lambda x: x.astype(jnp.float32), state[0].nu))
    _, new = tx.update(params, (cast, *state[1:]), params)
    assert new[0].nu["w"].dtype == jnp.float32


def test_a_centered_bfloat16_state_is_refused_with_advice_that_keeps_its_variance():
    # a centered bfloat16 state's nu holds nu - mu^2: cast as it is to float32, a
    # float32 rule would read the variance as nu; the advice adds mu^2 back
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((64, 128))}
    made, tx = (rj.rmsprop(1e-2, centered=True, storage=s) for s in ("bfloat16", "float32"))
    state = made.init(params)
    for _ in range(5):
        g = {"w": jnp.asarray(rng.normal(size=(64, 128)) + 3.0, jnp.float32)}
        state = made.update(g, state, params)[1]
    with pytest.raises(TypeError, match=r"holds the variance nu - mu\^2, so cast nu \+ mu\*\*2"):
        tx.update(g, state, params)
    mu = state[0].mu["w"].astype(jnp.float32)
    nu = state[0].nu["w"].astype(jnp.float32) + mu * mu
    cast = state[0]._replace(nu={"w": nu}, mu={"w": mu})
    got = tx.update(g, (cast, *state[1:]), params)[0]["w"]
    want = made.update(g, state, params)[0]["w"]
    np.testing.assert_allclose(got, want, rtol=0.02)


@pytest.mark.parametrize(
    "count,error,says",
    [
        (
            jnp.array([0, 5, 10], jnp.int32),
            ValueError,
            r"must be a scalar, got an array of shape \(3,\)",
        ),
        (jnp.array(0.5), TypeError, r"must be an integer scalar .*got an array of dtype float32"),
        (True, TypeError, r"must be an integer scalar .*got True"),
        (jnp.array(-5, jnp.int32), ValueError, r"must be in \[0, 2\*\*31 - 1\] \(int32\), got -5"),
        # a NumPy int64 restored without x64 wrapped to int32 before it was capped
        (np.int64(2**40), ValueError, r"must be in \[0, 2\*\*31 - 1\] \(int32\), got 1099"),
    ],
)
def test_a_step_count_that_is_no_integer_scalar_is_refused(count, error, says):
    # a (3,) count gave each column its own bias correction, in silence
    params = {"w": jnp.ones((2, 3))}
    for tx, part in [
        (rj.rmsprop(0.1, bias_correction=True), 0),
        (rj.rmsprop(rj.schedules.linear_schedule(0.1, 0.0, 10)), 1),
    ]:
        state = tx.init(params)
        bad = state[:part] + (state[part]._replace(count=count),) + state[part + 1 :]
        with pytest.raises(
            error,
            match=rf"^rmsjax\.rmsprop\.update: its part \w+ \(state\[{part}\]\): "
            rf"the state's count {says}",
        ):
            tx.update(params, bad, params)
    # a Python int (as optax's tree_set may leave) and a vmapped ensemble still step
    tx = rj.rmsprop(0.1, bias_correction=True)
    state = tx.init(params)
    tx.update(params, (state[0]._replace(count=3),) + state[1:], params)
    batch = {"w": jnp.ones((4, 2, 3))}
    _, states = jax.vmap(tx.update)(batch, jax.vmap(tx.init)(batch), batch)
    assert states[0].count.shape == (4,)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int16, jnp.uint8, jnp.uint16, jnp.uint32])
def test_a_count_of_another_integer_dtype_counts_on(dtype):
    # an int16 count compared with int32's largest in its own dtype (-1) and became -1:
    # a bias-corrected step of NaN, and a schedule read at step -1
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    grads = {"w": jnp.linspace(0.5, -2.0, 6)}
    for tx, part in [
        (rj.rmsprop(0.1, bias_correction=True), 0),
        (rj.rmsprop(rj.schedules.linear_schedule(0.1, 0.0, 10)), 1),
    ]:
        state = tx.init(params)
        at_3 = [
            state[:part] + (state[part]._replace(count=c),) + state[part + 1 :]
            for c in (
                jnp.array(3, dtype),
                jnp.array(3, jnp.int32),
            )
        ]
        got, new = jax.jit(tx.update)(grads, at_3[0], params)
        expected, _ = jax.jit(tx.update)(grads, at_3[1], params)
        np.testing.assert_array_equal(got["w"], expected["w"])
        assert new[part].count.dtype == jnp.int32 and int(new[part].count) == 4


def test_apply_updates_names_a_none_update_over_an_array_parameter():
    # it failed with Python's "unsupported operand type(s) for +"
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"^rmsjax\.apply_updates: the update at \['b'\] is None"):
        rj.apply_updates(params, {"w": jnp.ones(2), "b": None})
    kept = rj.apply_updates({"w": jnp.ones(2), "b": None}, {"w": jnp.ones(2), "b": None})
    assert kept["b"] is None


def test_accumulate_gradients_names_the_root_leaf():
    tx = rj.accumulate_gradients(rj.sgd(0.1), 2)
    with pytest.raises(
        ValueError, match=r"the update at <root> has shape \(3,\) but the state holds \(2,\)"
    ):
        tx.update(jnp.ones(3), tx.init(jnp.zeros(2)))


@pytest.mark.parametrize(
    "make,head",
    [
        (
            lambda s: rj.rmsprop(s),
            r"rmsjax\.rmsprop\.update: its part scale_by_learning_rate \(state\[1\]\): "
            r"the learning_rate",
        ),
        # torch's presets name their own argument, lr
        (
            lambda s: rj.compat.torch_rmsprop(lr=s, momentum=0.9),
            r"rmsjax\.compat\.torch_rmsprop\.update: the lr",
        ),
        (
            lambda s: rj.compat.torch_adagrad(lr=s, lr_decay=0.1),
            r"rmsjax\.compat\.torch_adagrad\.update: the lr",
        ),
        (
            lambda s: rj.compat.torch_adagrad(lr=s),
            r"rmsjax\.compat\.torch_adagrad\.update: the lr",
        ),
        (
            lambda s: rj.compat.keras_rmsprop(learning_rate=s),
            r"rmsjax\.compat\.keras_rmsprop\.update: its part scale_by_learning_rate "
            r"\(state\[\d\]\): the learning_rate",
        ),
        (
            lambda s: rj.scale_by_learning_rate(s),
            r"rmsjax\.scale_by_learning_rate\.update: the learning_rate",
        ),
    ],
)
def test_a_schedules_wrong_value_names_the_optimizer_built(make, head):
    params = {"w": jnp.ones(3)}
    tx = make(lambda count: jnp.ones(3))
    with pytest.raises(
        ValueError, match=rf"^{head} schedule must return a scalar, got a value of shape \(3,\)$"
    ):
        tx.update(params, tx.init(params), params)


def test_apply_updates_names_a_leaf_that_is_no_array():
    # an unfiltered equinox model holds functions: "Cannot determine dtype" named nothing
    params = {"w": jnp.ones(2), "act": jax.nn.relu}
    with pytest.raises(TypeError, match=r"^rmsjax\.apply_updates: the parameter at \['act'\] is"):
        rj.apply_updates(params, {"w": jnp.ones(2), "act": None})


@pytest.mark.parametrize("function", [rj.effective_step_sizes, rj.step_size_summary])
def test_step_size_diagnostics_name_a_parameter_that_is_no_array(function):
    # "Cannot determine dtype of <function relu>" named neither the function nor the leaf
    params = {"w": jnp.ones(2), "act": jax.nn.relu}
    tx = rj.rmsprop(0.1)
    name = function.__name__
    with pytest.raises(TypeError, match=rf"^rmsjax\.{name}: the parameter at \['act'\] is"):
        function(tx, tx.init({"w": params["w"]}), params)


def test_a_schedules_own_error_keeps_its_cause():
    def schedule(count):
        try:
            return {}["learning_rate"]
        except KeyError as missing:
            raise ValueError("no learning rate") from missing

    params = {"w": jnp.ones(3)}
    tx = rj.rmsprop(schedule)
    with pytest.raises(ValueError, match="^no learning rate$") as error:
        tx.update(params, tx.init(params), params)
    assert isinstance(error.value.__cause__, KeyError)


def test_piecewise_schedule_refuses_a_value_beyond_float32_and_takes_huge_counts():
    # its products were inf (NaN under jit, from optax's arithmetic) beyond float32
    with pytest.raises(ValueError, match=r"the value from boundary 3 on, 1e\+39, must be finite"):
        rj.schedules.piecewise_constant_schedule(1e38, {3: 10.0, 5: 0.01})
    schedule = rj.schedules.piecewise_constant_schedule(0.1, {3: 0.5})
    assert (
        float(schedule(2**40)) == float(schedule(jnp.int32(2**31 - 1))) == float(jnp.float32(0.05))
    )


@pytest.mark.parametrize(
    "tx,why",
    [
        (rj.rmsprop(0.1, storage="int8"), r"storage='int8' keeps real values only; the default"),
        (rj.adagrad(0.1, storage="bfloat16"), r"storage='bfloat16' keeps real values only"),
        (rj.rowwise_adagrad(0.1), r"the row-wise sum is written for real leaves"),
        (rj.factored_rmsprop(0.1), r"the factored second moment is written for real leaves"),
    ],
)
def test_a_complex_leaf_is_refused_with_advice_that_fits_the_rule(tx, why):
    # the advice said "use the default storage" to rules that have no storage option
    with pytest.raises(TypeError, match=rf"has dtype complex64; .*\(.*{why}.*\)\. Split the leaf"):
        tx.init({"w": jnp.ones((3, 4), jnp.complex64)})


def test_inject_hyperparams_names_itself_and_the_value_as_given():
    # construction errors named the inner factory alone and showed the value as the
    # array inject_hyperparams made of it; a string leaf gave numpy's own error
    with pytest.raises(
        ValueError,
        match=r"^rmsjax\.inject_hyperparams\(rmsprop\): its inner rmsprop: decay must be in "
        r"\[0, 1\), got 1\.5$",
    ):
        rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, decay=1.5)
    # a decay that float32 rounds to 1 was shown as the 1.0 it became
    with pytest.raises(ValueError, match=r"the largest float32 number under 1 .*got 0\.99999997"):
        rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1, decay=1 - 2**-25)
    with pytest.raises(TypeError, match=r"^rmsjax\.inject_hyperparams\(<lambda>\): inner_factory"):
        rj.inject_hyperparams(lambda learning_rate: 3)(learning_rate=0.1)
    tx = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1)
    for text in ("abc", "float32"):
        with pytest.raises(
            TypeError,
            match=rf"^rmsjax\.inject_hyperparams\(rmsprop\)\.init: .*\['name'\] is '{text}'",
        ):
            tx.init({"w": jnp.ones(3), "name": text})


@pytest.mark.parametrize(
    "make",
    [
        lambda s: rj.rmsprop(s),
        lambda s: rj.compat.torch_adagrad(lr=s),
        lambda s: rj.compat.keras_rmsprop(learning_rate=s),
        lambda s: rj.factored_rmsprop(s),
    ],
)
def test_a_schedule_that_cannot_take_the_step_count_is_refused_where_built(make):
    # it failed inside the first step with Python's own error, naming no rmsjax function
    with pytest.raises(TypeError, match=r"must be a number or a schedule, a function of the step"):
        make(lambda: 0.1)
    make(lambda count, scale=1.0: 0.1 * scale)  # a default or *args is fine
    make(lambda *counts: 0.1)


def test_a_prng_key_as_a_hyperparameter_is_named_as_such():
    # the value's repr read item() of every 0-d array: NotImplementedError for a key
    with pytest.raises(TypeError, match=r"^rmsjax\.rmsprop: learning_rate must be a real number"):
        rj.rmsprop(jax.random.key(0))


def test_a_chain_given_another_chains_state_names_what_it_got():
    # it said "got tuple of length 2", and "got EmptyState of length 0"
    params = {"w": jnp.ones(3)}
    with pytest.raises(
        TypeError,
        match=r"expected the tuple of 3 states that init returned, got a tuple of 2 "
        r"\(ScaleByRssState, ScaleByLearningRateState\)\.",
    ):
        rj.rmsprop(0.1).update(params, rj.adagrad(0.1).init(params), params)
    reordered = rj.chain(rj.clip(1.0), rj.rmsprop(0.1)).init(params)
    with pytest.raises(TypeError, match=r"its part rmsprop \(state\[0\]\): .*, got EmptyState\."):
        rj.chain(rj.rmsprop(0.1), rj.clip(1.0)).update(params, reordered, params)


@pytest.mark.parametrize(
    "make, where",
    [
        (lambda: rj.sgd(0.1, 0.9, accumulator_dtype=jnp.float32), r"sgd\.init: its part trace"),
        (lambda: rj.trace(0.9, accumulator_dtype=jnp.float32), r"trace\.init"),
        (lambda: rj.ema(0.9, accumulator_dtype=jnp.bfloat16), r"ema\.init"),
        (
            lambda: rj.accumulate_gradients(rj.sgd(1.0), 2, accumulator_dtype=jnp.float32),
            r"accumulate_gradients\.init",
        ),
    ],
)
def test_a_real_accumulator_dtype_for_complex_parameters_is_refused_at_init(make, where):
    # The buffer would drop the imaginary part (optax's does, with a warning); the first
    # step refused it as "a state made for real parameters. Initialise the optimizer
    # with the complex parameters", which it had been; accumulate_gradients dropped it
    params = {"a": jnp.array([1 + 2j, 3 - 1j], jnp.complex64), "b": jnp.ones(2)}
    with pytest.raises(
        TypeError,
        match=rf"^rmsjax\.{where}.*accumulator_dtype must be a complex dtype or None for a "
        r"parameter of dtype complex64 \(a real buffer would drop the imaginary part\), got "
        r"(float32|bfloat16)$",
    ):
        make().init(params)
    # a complex one steps; a real one for real leaves too
    state = rj.sgd(0.1, 0.9, accumulator_dtype=jnp.complex64).init({"a": params["a"]})
    assert state[0].trace["a"].dtype == jnp.complex64
    assert (
        rj.sgd(0.1, 0.9, accumulator_dtype=jnp.float32).init(params["b"])[0].trace.dtype
        == jnp.float32
    )


def test_a_state_cast_by_tree_cast_is_refused_with_the_way_to_cast_it():
    # docs/porting.md: optax's tree_cast casts rmsjax's step counts too
    params = {"w": jnp.ones(3)}
    tx = rj.rmsprop(0.1)
    cast = optax.tree_utils.tree_cast(tx.init(params), jnp.bfloat16)
    with pytest.raises(
        TypeError,
        match=r"count must be an integer scalar .*got an array of dtype bfloat16 "
        r"\(optax\.tree_utils\.tree_cast casts counts too: cast only the floating leaves, "
        r'or keep the state in bfloat16 with storage="bfloat16"\)$',
    ):
        tx.update(params, cast, params)


@pytest.mark.parametrize("function", ["group_state", "ungroup_state"])
def test_group_state_with_another_optimizer_s_state_names_itself(function):
    # the refusal named rmsjax.rmsprop.update, which the user never called
    params = [jnp.ones(3), jnp.ones(3)]
    tx = rj.grouped(rj.rmsprop(0.01, momentum=0.9))
    other = rj.adagrad(0.1).init(params)
    if function == "ungroup_state":
        other = rj.grouped(rj.adagrad(0.1)).init(params)
    with pytest.raises(
        TypeError,
        match=rf"^rmsjax\.{function}: its tx rmsprop: expected the tuple of 3 states that "
        r"init returned, got a tuple of 2 \(ScaleByRssState, ScaleByLearningRateState\)",
    ):
        getattr(rj, function)(tx, other, params)


@pytest.mark.parametrize("max_norm", [1.0, float("inf")])
def test_clip_by_global_norm_refuses_integer_gradients(max_norm):
    # an integer leaf was clipped, then truncated: ones of norm sqrt(3) came out 0 (and
    # with max_norm=inf it went through unchecked)
    tx = rj.clip_by_global_norm(max_norm)
    grads = {"a": jnp.ones(3, jnp.int32), "b": jnp.ones(2)}
    with pytest.raises(
        TypeError, match=r"^rmsjax\.clip_by_global_norm\.update: leaf \['a'\] has dtype int32"
    ):
        tx.update(grads, tx.init(grads))
    complex_grads = {"z": jnp.ones(3, jnp.complex64)}
    updates, _ = tx.update(complex_grads, tx.init(complex_grads))
    want = 1 / np.sqrt(3) if max_norm == 1.0 else 1.0
    np.testing.assert_allclose(np.asarray(updates["z"]), want, rtol=1e-6)


def test_a_structure_error_survives_static_fields_that_hold_arrays():
    # a node's static data may hold arrays (equinox static fields), whose == gives no
    # single answer: building the message raised NumPy's error instead of the structure's
    class Tagged:
        def __init__(self, w, tag):
            self.w, self.tag = w, tag

    jax.tree_util.register_pytree_node(
        Tagged, lambda t: ((t.w,), t.tag), lambda tag, children: Tagged(children[0], tag)
    )
    params, updates = Tagged(jnp.ones(3), np.arange(3)), Tagged(jnp.ones(3), np.arange(4))
    with pytest.raises(ValueError, match=r"^rmsjax\.apply_updates: the tree structure .* static"):
        rj.apply_updates(params, updates)


@pytest.mark.parametrize(
    "build, says",
    [
        (
            lambda: rj.rmsprop(0.1, centered=1),
            r"^rmsjax\.rmsprop: centered must be True or False, got 1 \(int\)",
        ),
        (
            lambda: rj.sgd(0.1, momentum=0.9, nesterov=0),
            r"^rmsjax\.sgd: nesterov must be True or False, got 0",
        ),
        (
            lambda: rj.clip_by_global_norm(0),
            r"^rmsjax\.clip_by_global_norm: max_norm must be > 0, got 0",
        ),
        (lambda: rj.rmsprop(jnp.array([0.5])), r"^rmsjax\.rmsprop: learning_rate must be a scalar"),
        (
            lambda: rj.apply_if_finite(rj.sgd(0.1), 2.0),
            r"max_consecutive_errors must be an integer",
        ),
    ],
)
def test_optax_idioms_porting_md_lists_as_refused_are_refused(build, says):
    # porting.md, "What still differs": each is accepted by optax
    with pytest.raises((TypeError, ValueError), match=says):
        build()
