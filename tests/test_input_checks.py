"""Inputs a user can get wrong between steps: parameters that do not go with their
gradients, trees that changed under a grouped or accumulating state, hyperparameters that
pass a range check but not float32. Each is refused with an error naming the function,
the leaf or argument and the value, where it was once truncated, mixed up or NaN."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsjax as rj

PARAMS = {"w": jnp.ones(3), "b": jnp.ones(2)}
GRADS = {"w": jnp.array([1.0, -1.0, 0.5]), "b": jnp.array([0.25, -2.0])}


def _steps(tx):
    """update (+ apply_updates) and update_and_apply, each jitted."""

    def split(g, s, p):
        updates, s = tx.update(g, s, p)
        return rj.apply_updates(p, updates), s

    return [jax.jit(split), jax.jit(lambda g, s, p: rj.update_and_apply(tx, g, s, p))]


OPTIMIZERS = {
    "rmsprop": lambda: rj.rmsprop(0.1, momentum=0.9),
    "adagrad": lambda: rj.adagrad(0.1),
    "grouped": lambda: rj.grouped(rj.rmsprop(0.1)),
    "weight decay": lambda: rj.chain(rj.add_decayed_weights(0.1), rj.sgd(0.1)),
    "torch": lambda: rj.compat.torch_rmsprop(weight_decay=0.1),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_parameters_are_refused_not_truncated(make, dtype):
    tx = make()
    state = tx.init(PARAMS)
    params = {**PARAMS, "w": jnp.ones(3, dtype)}
    for step in _steps(tx):
        with pytest.raises(
            TypeError, match=rf"the parameter at \['w'\] has dtype {dtype.__name__}"
        ):
            step(GRADS, state, params)


def test_apply_updates_refuses_integer_parameters():
    with pytest.raises(TypeError, match=r"rmsjax.apply_updates: the parameter at \['w'\]"):
        rj.apply_updates({"w": jnp.array([5, 5, 5])}, {"w": jnp.array([1.0, -1.0, 0.5])})


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_parameters_of_another_shape_are_refused(make):
    tx = make()
    state = tx.init(PARAMS)
    for step in _steps(tx):
        with pytest.raises(ValueError, match=r"at \['w'\] has shape \(4,\)"):
            step(GRADS, state, {**PARAMS, "w": jnp.ones(4)})


def test_a_missing_parameter_is_refused_where_the_rule_reads_it():
    tx = rj.add_decayed_weights(0.1)
    with pytest.raises(
        ValueError, match=r"rmsjax.add_decayed_weights.update: the parameter at \['w'\] is None"
    ):
        tx.update(GRADS, tx.init(PARAMS), {**PARAMS, "w": None})


@pytest.mark.parametrize("make", [OPTIMIZERS["rmsprop"], OPTIMIZERS["grouped"]])
def test_update_and_apply_leaves_a_none_parameter_none_as_apply_updates_does(make):
    tx = make()
    state = tx.init(PARAMS)
    params = {**PARAMS, "w": None}
    split, fused = _steps(tx)
    chex.assert_trees_all_equal(fused(GRADS, state, params), split(GRADS, state, params))
    assert fused(GRADS, state, params)[0]["w"] is None


@pytest.mark.parametrize(
    "make",
    [
        lambda d: rj.rmsprop(0.01, decay=d, bias_correction=True),
        lambda d: rj.scale_by_rms(decay=d),
        lambda d: rj.ema(d),
        lambda d: rj.compat.tf1_rmsprop(0.01, decay=d),
        lambda d: rj.factored_rmsprop(0.01, decay=d),
    ],
)
def test_a_decay_that_float32_rounds_to_one_is_refused(make):
    # 0.99999999 is under 1, but float32 rounds it to 1: 1 - decay**t was 0 (NaN and
    # infinite steps with bias correction or debiasing).
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\) and at most 0.99999994"):
        make(0.99999999)
    largest = float(np.nextafter(np.float32(1), np.float32(0)))
    make(largest)  # the largest float32 under 1 is fine


def test_the_largest_decay_steps_finitely():
    largest = float(np.nextafter(np.float32(1), np.float32(0)))
    g = jnp.array([1.0, 0.0])
    for tx in [rj.rmsprop(0.01, decay=largest, bias_correction=True), rj.ema(largest)]:
        updates, _ = jax.jit(tx.update)(g, tx.init(g), g)
        assert np.all(np.isfinite(updates)), updates
        assert updates[1] == 0


@pytest.mark.parametrize("flag", [np.True_, True])
def test_nesterov_without_momentum_is_refused_whatever_its_bool_type(flag):
    with pytest.raises(ValueError, match="nesterov=True needs a momentum"):
        rj.sgd(0.1, nesterov=flag)


def test_grouped_state_refuses_a_renamed_or_reshaped_tree():
    # Same shapes in the same order: the blocks alone cannot tell the trees apart, and
    # "small"'s sum of squares went to the renamed leaf.
    tx = rj.grouped(rj.adagrad(0.1))
    state = tx.init({"big": jnp.zeros(4), "small": jnp.zeros(4)})
    renamed = {"a_new": jnp.full(4, 0.01), "big": jnp.full(4, 100.0)}
    for call in [
        lambda: tx.update(renamed, state),
        lambda: rj.update_and_apply(tx, renamed, state, renamed),
        lambda: tx.update((jnp.ones(4), jnp.ones(4)), state),
    ]:
        with pytest.raises(
            ValueError, match=r"(?s)rmsjax.grouped.update: the tree structure.*'small'"
        ):
            call()
    with pytest.raises(ValueError, match=r"(?s)rmsjax.ungroup_state: the tree structure.*a_new"):
        rj.ungroup_state(tx, state, renamed)
    # the structure travels through jit and group_state
    same = {"big": jnp.ones(4), "small": jnp.ones(4)}
    stepped = jax.jit(tx.update)(same, state)[1]
    assert stepped.structure == state.structure
    regrouped = rj.group_state(tx, rj.ungroup_state(tx, stepped, same), same)
    assert regrouped.structure == state.structure
    assert jax.tree.leaves(state) == jax.tree.leaves(state.inner)  # nothing to save


@pytest.mark.parametrize("tx", [rj.rowwise_adagrad(0.05), rj.factored_rmsprop(0.01)])
def test_grouped_refuses_rules_with_row_statistics(tx):
    with pytest.raises(TypeError, match="rmsjax.grouped: tx must be built only from elementwise"):
        rj.grouped(tx)


@pytest.mark.parametrize(
    "make,named",
    [
        (lambda: rj.chain(optax.clip(1.0), rj.rmsprop(0.1)), r"optax\.clip \(state\[0\]\)"),
        (
            lambda: rj.chain(rj.scale(2.0), rj.masked(rj.rmsprop(0.1), lambda p: p)),
            r"rmsjax\.masked \(state\[1\]\)",
        ),
        (
            lambda: rj.chain(rj.chain(rj.clip_by_global_norm(1.0), rj.sgd(0.1)), rj.sgd(0.1)),
            r"rmsjax\.clip_by_global_norm \(state\[0\]\[0\]\)",
        ),
        (
            lambda: rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1),
            r"rmsjax\.inject_hyperparams\(rmsprop\)",
        ),
    ],
)
def test_grouped_names_the_part_that_is_no_elementwise_rule(make, named):
    # it said only "this one has other parts"
    with pytest.raises(TypeError, match=rf"^rmsjax\.grouped: .* this one holds {named}"):
        rj.grouped(make())


@pytest.mark.parametrize(
    "make,named", [(lambda: optax.scale(2.0), "optax.scale"), (optax.adam, "optax.chain")]
)
def test_grouped_says_another_librarys_transformation_is_one(make, named):
    # optax.adam was said to "hold optax.chain", as if a part of it could be moved out
    with pytest.raises(TypeError, match=r"^rmsjax\.grouped: tx must be built from rmsjax's") as e:
        rj.grouped(make(1e-3) if make is optax.adam else make())
    assert f"got {named}, a transformation from another library" in str(e.value)


def test_ungroup_state_of_a_chain_says_to_pass_the_grouped_part():
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    part = rj.grouped(rj.rmsprop(0.1))
    tx = rj.chain(rj.clip_by_global_norm(1.0), part)
    state = tx.init(params)
    with pytest.raises(
        TypeError, match=r"got chain\. For a grouped part in a chain, pass it and its state\.$"
    ):
        rj.ungroup_state(tx, state, params)
    chex.assert_trees_all_equal(
        rj.ungroup_state(part, state[1], params), rj.rmsprop(0.1).init(params)
    )


def test_hyperparameters_injected_around_grouped_step_as_the_plain_optimizer():
    # the way the grouped docstring gives (inject_hyperparams inside grouped is refused)
    params = {"a": jnp.ones(3), "b": jnp.full(3, 2.0)}
    tx = rj.inject_hyperparams(lambda learning_rate: rj.grouped(rj.rmsprop(learning_rate)))(
        learning_rate=0.1
    )
    plain = rj.rmsprop(0.1)
    got = rj.update_and_apply(tx, params, tx.init(params), params)[0]
    want = rj.update_and_apply(plain, params, plain.init(params), params)[0]
    chex.assert_trees_all_equal(got, want)


def test_rows_without_elements_keep_a_finite_rowwise_state():
    params = {"emb": jnp.ones((8, 4)), "empty": jnp.ones((8, 0))}
    grads = {"emb": jnp.full((8, 4), 0.5), "empty": jnp.ones((8, 0))}
    tx = rj.apply_if_finite(rj.rowwise_adagrad(0.05), 100)
    state = tx.init(params)
    for _ in range(3):
        params, state = rj.update_and_apply(tx, grads, state, params)
    assert int(state.notfinite_count) == 0
    assert np.all(np.isfinite(state.inner_state[0].sum_of_squares["empty"]))
    assert float(params["emb"][0, 0]) < 1  # it stepped


def test_warmup_cosine_errors_name_it_and_end_values_above_the_peak_are_optax_s():
    with pytest.raises(ValueError, match="rmsjax.schedules.warmup_cosine_decay_schedule: exponent"):
        rj.schedules.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10, exponent=0.0)
    for end_value in (-0.5, 2.0):
        ours = rj.schedules.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10, end_value=end_value)
        theirs = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10, end_value=end_value)
        for t in range(13):
            assert float(ours(t)) == float(theirs(t))


def test_accumulate_gradients_names_a_mismatched_tree_or_shape():
    tx = rj.accumulate_gradients(rj.rmsprop(0.1), 2)
    state = tx.init({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
    with pytest.raises(
        ValueError, match=r"(?s)accumulate_gradients.update: the tree structure.*'b'"
    ):
        tx.update({"a": jnp.ones(3)}, state)
    with pytest.raises(
        ValueError, match=r"update at \['a'\] has shape \(4,\) but the state holds \(3,\)"
    ):
        tx.update({"a": jnp.ones(4), "b": jnp.ones((2, 2))}, state)


@pytest.mark.parametrize("every_k", [3, 5, 6, 7])
def test_the_mean_of_gradients_at_float32_s_maximum_is_finite(every_k):
    top = np.finfo(np.float32).max
    tx = rj.accumulate_gradients(rj.sgd(1.0), every_k)
    state, step = tx.init(jnp.zeros(2)), jax.jit(tx.update)
    for _ in range(every_k):
        updates, state = step(jnp.array([top, -top], jnp.float32), state)
    np.testing.assert_array_equal(updates, [-top, top])


def test_step_size_summary_of_a_leaf_without_elements_is_nan():
    params = {"a": jnp.ones(3), "e": jnp.ones((0,))}
    tx = rj.rmsprop(0.1)
    summary = jax.jit(lambda s: rj.step_size_summary(tx, s, params))(tx.init(params))
    assert all(np.isnan(float(v)) for v in summary["e"])
    np.testing.assert_allclose(float(summary["a"].max), 0.1 / np.sqrt(1e-8), rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: rj.schedules.linear_schedule(1.0, 0.0, n),
        lambda n: rj.schedules.cosine_decay_schedule(1.0, n),
        lambda n: rj.schedules.exponential_decay(1.0, 10, 0.5, transition_begin=n),
        lambda n: rj.accumulate_gradients(rj.sgd(0.1), n),
    ],
)
def test_counts_beyond_int32_are_refused_where_given(make):
    with pytest.raises(
        ValueError, match=r"must be at most 2147483647 \(2\*\*31 - 1\), got 2147483648"
    ):
        make(2**31)
    make(2**31 - 1)


def test_a_state_array_of_an_integer_dtype_is_refused():
    params = {"w": jnp.ones(3)}
    tx = rj.rmsprop(0.1)
    state = tx.init(params)
    truncating = (state[0]._replace(nu={"w": jnp.zeros(3, jnp.int32)}), *state[1:])
    with pytest.raises(TypeError, match=r"the state's nu at \['w'\] has dtype int32"):
        tx.update(params, truncating, params)


def test_accumulate_gradients_refuses_integer_gradients_naming_the_leaf():
    tx = rj.accumulate_gradients(rj.rmsprop(0.1), 2)
    state = tx.init({"a": jnp.ones(3)})
    with pytest.raises(
        TypeError, match=r"rmsjax.accumulate_gradients.update: leaf \['a'\] has dtype int32"
    ):
        tx.update({"a": jnp.ones(3, jnp.int32)}, state)


def test_a_grouped_step_with_a_leaf_left_out_names_the_structures():
    # As a per-leaf state does (optax's too): a None update where the state holds an
    # array is refused, and the message shows both trees rather than a count of blocks.
    params = {"a": jnp.ones(3), "b": jnp.ones(4)}
    grads = {"a": jnp.ones(3), "b": None}
    for tx, where in [(rj.rmsprop(0.1), "rmsprop"), (rj.grouped(rj.rmsprop(0.1)), "grouped")]:
        with pytest.raises(
            ValueError, match=rf"(?s)rmsjax.{where}.update: the tree structure.*'b': None"
        ):
            tx.update(grads, tx.init(params), params)


WRAPPERS = {
    "masked": (lambda tx: rj.masked(tx, {"w": True, "b": False}), "masked"),
    "grouped": (rj.grouped, "grouped"),
    "inject_hyperparams": (
        lambda tx: rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1),
        r"inject_hyperparams\(rmsprop\)",
    ),
    "apply_if_finite": (lambda tx: rj.apply_if_finite(tx, 3), "apply_if_finite"),
    "accumulate_gradients": (
        lambda tx: rj.apply_if_finite(rj.accumulate_gradients(tx, 1), 3),
        "apply_if_finite",
    ),
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
@pytest.mark.parametrize("apply", [False, True])
def test_a_wrapper_s_errors_name_the_wrapper_then_its_inner_transformation(wrap, apply):
    make, name = wrap
    tx = make(rj.rmsprop(0.1))
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    state = tx.init(params)

    def step(grads):
        if apply:
            return rj.update_and_apply(tx, grads, state, params)
        return tx.update(grads, state, params)

    transposed = {"w": jnp.ones((4, 3)), "b": jnp.ones(4)}
    # grouped compares the gradients with the parameters its state was made for itself
    says = "the update at \\['w'\\] has shape" if name == "grouped" else "its inner"
    with pytest.raises(ValueError, match=rf"^rmsjax.{name}.update: {says}.*\(4, 3\)"):
        step(transposed)
    integer = {"w": jnp.ones((3, 4), jnp.int32), "b": jnp.ones(4, jnp.int32)}
    # masked checks every gradient itself: those it leaves out pass on unchanged
    says = "leaf \\['b'\\] has " if name == "masked" else "its inner .*"
    with pytest.raises(TypeError, match=rf"^rmsjax.{name}.update: {says}dtype int32"):
        step(integer)
    with pytest.raises(TypeError, match=rf"^rmsjax.{name}.init: its inner .*rmsprop: .*int32"):
        make(rj.rmsprop(0.1)).init(integer)


@pytest.mark.parametrize(
    "make", [lambda: rj.sgd(1.0, momentum=0.9), lambda: rj.rmsprop(0.1, momentum=0.9)]
)
def test_complex_gradients_on_a_state_made_for_real_parameters_are_refused(make):
    # the real momentum buffer dropped the imaginary part without a word
    tx = make()
    params = jnp.zeros(2)
    state = tx.init(params)
    grads = jnp.array([1j, 1 + 1j], jnp.complex64)
    with pytest.raises(
        TypeError, match=r"has dtype complex64 but the state's .* float32, made for"
    ):
        tx.update(grads, state, params)
    complex_params = jnp.zeros(2, jnp.complex64)  # made for complex parameters: it steps
    update, _ = tx.update(grads, tx.init(complex_params), complex_params)
    assert update.dtype == jnp.complex64


@pytest.mark.parametrize("make", [*OPTIMIZERS.values(), lambda: rj.sgd(0.1)])
def test_a_complex_update_to_a_real_parameter_is_refused_not_cut_to_its_real_part(make):
    # update_and_apply(sgd) and apply_updates added only the real part, without a word
    tx = make()
    state = tx.init(PARAMS)
    grads = {**GRADS, "w": GRADS["w"] * (1 + 2j)}
    for step in _steps(tx):
        with pytest.raises(
            TypeError,
            match=r"(update at|leaf) \['w'\] has dtype complex64( and its parameter| but|; th)",
        ):
            step(grads, state, PARAMS)
    with pytest.raises(TypeError, match=r"^rmsjax\.apply_updates: the update at \['w'\] has dt"):
        rj.apply_updates(PARAMS, grads)
    # update alone lets the complex gradient through: a later part may take its real part
    real_part = optax.stateless(lambda u, p: jax.tree.map(jnp.real, u))
    tx = optax.chain(rj.scale(-0.1), real_part)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_array_equal(updates["w"], -0.1 * GRADS["w"])
    complex_params = {**PARAMS, "w": PARAMS["w"].astype(jnp.complex64)}  # complex: it adds
    np.testing.assert_array_equal(rj.apply_updates(complex_params, grads)["w"], 1 + grads["w"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: rj.rmsprop(0.1),
        lambda: rj.adagrad(0.1, storage="int8"),
        lambda: rj.sgd(0.1),
        lambda: rj.grouped(rj.rmsprop(0.1, momentum=0.9)),
        lambda: rj.factored_rmsprop(0.1),
        lambda: rj.compat.torch_rmsprop(),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_8_bit_float_parameters_are_refused_by_name(make, dtype):
    # they failed inside the step with JAX's "no implicit dtype promotion path"
    params = {**PARAMS, "w": PARAMS["w"].astype(dtype)}
    with pytest.raises(
        TypeError, match=rf"leaf \['w'\] has dtype {dtype.__name__}; rmsjax does not take 8-bit"
    ):
        make().init(params)


@pytest.mark.parametrize(
    "call, function",
    [
        (lambda g: rj.global_norm(g), "global_norm"),
        (lambda g: rj.clip_by_global_norm(1.0).update(g, rj.EmptyState()), "clip_by_global_norm"),
        (
            lambda g: (lambda tx: tx.update(g, tx.init(PARAMS), PARAMS))(
                rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(0.1))
            ),
            "chain",
        ),
        (lambda g: rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1).init(g), "inject"),
        (
            lambda g: (lambda tx: tx.update(g, tx.init(PARAMS), PARAMS))(
                rj.inject_hyperparams(rj.adagrad)(learning_rate=0.1)
            ),
            "inject",
        ),
    ],
)
def test_8_bit_float_gradients_are_refused_by_name_where_a_whole_tree_is_read(call, function):
    # the global norm and inject_hyperparams' dtype of the hyperparameters read every leaf
    # before any rule did: they failed with JAX's TypePromotionError, naming nothing
    grads = {**PARAMS, "w": PARAMS["w"].astype(jnp.float8_e4m3fn)}
    with pytest.raises(TypeError, match=rf"^rmsjax\.{function}.*leaf \['w'\] has dtype float8"):
        call(grads)


def test_a_chain_s_init_names_the_chain_then_the_part():
    # a part after a transformation that is no rule named only itself at init
    params = {**PARAMS, "w": jnp.ones(3, jnp.int32)}
    for tx, part in [
        (rj.chain(rj.clip_by_global_norm(1.0), rj.scale(0.1)), r"scale \(state\[1\]\)"),
        (rj.chain(optax.clip(1.0), rj.rmsprop(0.1)), r"rmsprop \(state\[1\]\)"),
    ]:
        with pytest.raises(TypeError, match=rf"^rmsjax\.chain\.init: its part {part}: leaf"):
            tx.init(params)


def test_clip_by_global_norm_takes_a_python_float_leaf_eagerly_as_under_jit():
    grads = {"w": jnp.ones(3), "s": 0.5}
    tx = rj.clip_by_global_norm(1.0)
    eager, _ = tx.update(grads, tx.init(grads))
    jitted, _ = jax.jit(tx.update)(grads, tx.init(grads))
    for key in grads:
        np.testing.assert_array_equal(eager[key], jitted[key])
    norm = np.sqrt(3.0 + 0.25)
    np.testing.assert_allclose(eager["s"], 0.5 / norm, rtol=1e-6)


@pytest.mark.parametrize(
    "value,error",
    [
        (True, TypeError),
        ("0.9", TypeError),
        (None, TypeError),
        (1 + 2j, TypeError),
        (1e39, ValueError),
        (float("nan"), ValueError),
    ],
)
def test_an_injected_hyperparameter_set_in_the_state_is_checked(value, error):
    tx = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1)
    params = jnp.ones(3)
    state = tx.init(params)
    with pytest.raises(error, match=r"^rmsjax.inject_hyperparams: state.hyperparams\['decay'\]"):
        state.hyperparams["decay"] = value
    assert float(state.hyperparams["decay"]) == np.float32(0.9)  # unchanged
    state.hyperparams["decay"] = 1.0  # a number, out of range: refused by the step
    with pytest.raises(
        ValueError, match=r"inject_hyperparams\(rmsprop\).update: its inner rmsprop"
    ):
        tx.update(params, state, params)


def test_masked_refuses_a_mask_of_none():
    with pytest.raises(TypeError, match=r"rmsjax.masked: mask must be a pytree of bools"):
        rj.masked(rj.scale(0.0), None)


def test_the_geometric_mean_of_equal_step_sizes_is_that_size():
    tx = rj.rmsprop(1e-3)
    params = {"w": jnp.ones(1000)}
    summary = rj.step_size_summary(tx, tx.init(params), params)["w"]
    assert summary.min <= summary.geometric_mean <= summary.max
    assert float(summary.geometric_mean) == float(summary.max)


def test_diagnostics_name_themselves_before_the_optimizer_s_error():
    params = {"w": jnp.ones(3)}
    other = rj.adagrad(0.1).init(params)
    for function in [rj.effective_step_sizes, rj.step_size_summary]:
        with pytest.raises(TypeError, match=rf"^rmsjax.{function.__name__}: its tx rmsprop: "):
            function(rj.rmsprop(0.1), other, params)


INTEGER_HYPERPARAMETERS = {
    # (constructor of one value v, a value where the integer's dtype would wrap/overflow)
    "rmsprop eps": (lambda v: rj.rmsprop(0.1, eps=v), 2**32),
    "rmsprop lr": (lambda v: rj.rmsprop(v * 1e-12), 2**40),
    "adagrad eps": (lambda v: rj.adagrad(0.1, eps=v), 2**32),
    "add_decayed_weights": (lambda v: rj.add_decayed_weights(v * 1e-12), 2**40),
    "clip_by_global_norm": (lambda v: rj.clip_by_global_norm(v), 2**32),
    "scale": (lambda v: rj.scale(v * 1e-12), 2**40),
    "rowwise eps": (lambda v: rj.rowwise_adagrad(0.1, eps=v), 2**32),
    "factored eps": (lambda v: rj.factored_rmsprop(0.1, eps=v), 2**32),
    "torch weight_decay": (lambda v: rj.compat.torch_rmsprop(weight_decay=v * 1e-12), 2**40),
    "torch lr_decay": (lambda v: rj.compat.torch_adagrad(lr_decay=v * 1e-12), 2**40),
    "keras epsilon": (lambda v: rj.compat.keras_rmsprop(epsilon=v), 2**32),
    "exponential init": (lambda v: rj.sgd(rj.schedules.exponential_decay(v, 3, 0.5)), 2**32),
    "cosine init": (lambda v: rj.sgd(rj.schedules.cosine_decay_schedule(v, 3)), 2**32),
    "cosine exponent": (lambda v: rj.sgd(rj.schedules.cosine_decay_schedule(1.0, 9, 0.0, v)), 200),
    "warmup peak": (lambda v: rj.sgd(rj.schedules.warmup_cosine_decay_schedule(0, v, 1, 5)), 2**32),
}


@pytest.mark.parametrize("kind", ["python int", "int64", "uint64", "uint8"])
@pytest.mark.parametrize("name", list(INTEGER_HYPERPARAMETERS))
def test_integer_hyperparameters_step_as_their_floats(name, kind):
    # validation.md: a Python integer of any size (within float32) and a NumPy or JAX
    # scalar of any real dtype is a number. Python ints beyond int32 raised an
    # OverflowError in the first step; NumPy int64 2**32 was 0 under jit (eps 0: NaN),
    # 2**31 negative; a uint8 exponent of 200 gave NaN under jit
    make, big = INTEGER_HYPERPARAMETERS[name]
    if kind == "uint8":
        big = 200 if big == 200 else 255
    value = {"python int": int, "int64": np.int64, "uint64": np.uint64, "uint8": np.uint8}[kind](
        big
    )
    params = {"w": jnp.array([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])}
    grads = {"w": jnp.array([[0.5, 0.0, -4.0], [1.0, -2.0, 3.0]])}
    results = []
    for v in (value, float(big)):
        tx = make(v)
        state, step = tx.init(params), jax.jit(tx.update)
        for _ in range(3):
            updates, state = step(grads, state, params)
        results.append(np.asarray(updates["w"]))
    assert np.all(np.isfinite(results[0])), results[0]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def _traced_steps(make, value, params, steps=4):
    """The updates of ``steps`` steps of ``make(value)`` with ``value`` traced."""

    def run(value):
        tx = make(value)
        state = tx.init(params)
        for i in range(steps):
            updates, state = tx.update(jnp.cos(params) * (1 + i) + 0.1, state, params)
        return updates

    return np.asarray(jax.jit(run)(value))


TRACED_OUT_OF_RANGE = {
    "rmsprop decay": (
        lambda d: rj.rmsprop(0.1, decay=d),
        lambda d: optax.rmsprop(0.1, decay=d),
        1.5,
    ),
    "centered decay": (
        lambda d: rj.rmsprop(0.1, decay=d, centered=True),
        lambda d: optax.rmsprop(0.1, decay=d, centered=True),
        1.5,
    ),
    "bfloat16 decay": (lambda d: rj.rmsprop(0.1, decay=d, storage="bfloat16"), None, 1.5),
    "int8 decay": (lambda d: rj.rmsprop(0.1, decay=d, storage="int8"), None, 1.5),
    "torch alpha": (lambda a: rj.compat.torch_rmsprop(0.1, alpha=a), None, 1.5),
    "factored decay": (
        lambda d: rj.factored_rmsprop(0.1, decay=d, min_dim_size_to_factor=2),
        None,
        1.5,
    ),
    "initial_scale": (
        lambda v: rj.rmsprop(0.1, initial_scale=v),
        lambda v: optax.rmsprop(0.1, initial_scale=v),
        -10.0,
    ),
    "adagrad initial value": (
        lambda v: rj.adagrad(0.1, initial_accumulator_value=v),
        None,  # optax steps by 0 while the sum is negative, then goes on
        -10.0,
    ),
    "rowwise initial value": (
        lambda v: rj.rowwise_adagrad(0.1, initial_accumulator_value=v),
        None,
        -1.0,
    ),
}


@pytest.mark.parametrize(
    "make, peer, value", TRACED_OUT_OF_RANGE.values(), ids=TRACED_OUT_OF_RANGE.keys()
)
def test_a_traced_hyperparameter_out_of_range_shows_as_nan_not_a_frozen_step(make, peer, value):
    # A traced value is not checked (validation.md). Out of range it made a negative
    # second moment, which the encoding of moments beyond float32 read as one held
    # scaled: steps of 1e-24, a weight frozen in silence, where optax's are NaN.
    params = jnp.linspace(-1.0, 1.0, 300).reshape(30, 10)
    updates = _traced_steps(make, value, params)
    assert np.isnan(updates).any()
    assert not ((np.abs(updates) < 1e-20) & (updates != 0)).any()  # no frozen element
    if peer is not None:  # optax's first step is NaN too, somewhere
        assert np.isnan(_traced_steps(peer, value, params, steps=1)).any()
    # in range (0.5 for each of these) the traced value steps as the constant one does
    tx = make(0.5)
    state = tx.init(params)
    for i in range(4):
        expected, state = tx.update(jnp.cos(params) * (1 + i) + 0.1, state, params)
    np.testing.assert_allclose(_traced_steps(make, 0.5, params), expected, rtol=1e-6)


def test_a_decay_set_out_of_range_in_an_injected_state_shows_as_nan_under_jit():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([0.3, -0.2])}
    grads = jax.tree.map(lambda x: jnp.cos(x) + 0.1, params)
    for module in (rj, optax):
        tx = module.inject_hyperparams(module.rmsprop)(learning_rate=0.1)
        state = tx.init(params)
        state.hyperparams["decay"] = 1.5  # a number: the range is checked by an eager step
        step = jax.jit(tx.update)
        for _ in range(3):
            updates, state = step(grads, state, params)
        assert all(bool(jnp.isnan(u).all()) for u in jax.tree.leaves(updates)), module


def test_a_hyperparameter_the_state_s_dtype_rounds_to_zero_is_refused_where_given():
    params = jnp.ones(3)
    half = rj.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float16)
    says = r"^rmsjax\.inject_hyperparams\(rmsprop\)\.init: eps is 1e-08, which is 0 in float16"
    for init in (lambda tx: tx.init, lambda tx: jax.jit(tx.init)):  # decided on the host
        with pytest.raises(ValueError, match=says):
            init(half(learning_rate=0.1))(params)  # optax stores eps = 0 and runs with it
    state = half(learning_rate=0.1, eps=1e-3).init(params)
    with pytest.raises(ValueError, match=r"\['learning_rate'\] is 1e-09, which is 0 in float16"):
        state.hyperparams["learning_rate"] = 1e-9
    assert float(state.hyperparams["learning_rate"]) == np.float16(0.1)  # unchanged
    state.hyperparams["learning_rate"] = 0.0  # a 0 given is a 0
    tx = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = 1e-30  # float32 holds it
    # the advice fits the dtype: float32 is already the widest without x64
    with pytest.raises(
        ValueError,
        match=r"is 1e-46, which is 0 in float32.*; pass a value the dtype holds \(or, with "
        r"jax_enable_x64",
    ):
        state.hyperparams["learning_rate"] = 1e-46
    with pytest.raises(ValueError, match=r"; pass a wider hyperparam_dtype \(float32"):
        state = half(learning_rate=0.1, eps=1e-3).init(params)
        state.hyperparams["learning_rate"] = 1e-9


@pytest.mark.parametrize(
    "build, argument",
    [
        (
            lambda v: rj.compat.tf1_adagrad(0.1, initial_accumulator_value=v),
            "initial_accumulator_value",
        ),
        (lambda v: rj.schedules.exponential_decay(0.1, 10, v), "decay_rate"),
        (lambda v: rj.schedules.cosine_decay_schedule(0.1, 10, exponent=v), "exponent"),
    ],
)
def test_a_bound_that_must_be_exceeded_is_exceeded_in_float32(build, argument):
    # tf1_adagrad refused 0 (TF1 divides by the root of the sum) but took 1e-46, which
    # is 0 in float32, the dtype the step computes in
    build(1e-45)  # the smallest float32 number over 0
    with pytest.raises(ValueError, match=rf"{argument} must be > 0 in float32.*got 1e-46$"):
        build(1e-46)
    with jax.enable_x64(True):  # where the step may compute in float64, 1e-46 is > 0
        build(1e-46)


def test_masked_and_apply_updates_refuse_gradients_no_rule_would_take():
    # a leaf masked out passes its gradient on: an integer one was added to its
    # parameter, an 8-bit float one passed through; apply_updates raised JAX's
    # TypePromotionError, naming no leaf
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = rj.masked(rj.rmsprop(0.1), {"w": True, "b": False})
    state = tx.init(params)
    for dtype in (jnp.int32, jnp.float8_e4m3fn):
        grads = {"w": jnp.ones(3), "b": jnp.ones(2, dtype)}
        for call in (tx.update, lambda g, s, p: rj.update_and_apply(tx, g, s, p)):
            with pytest.raises(TypeError, match=r"^rmsjax\.masked\.update: leaf \['b'\] has dtype"):
                call(grads, state, params)
    with pytest.raises(
        TypeError, match=r"^rmsjax\.apply_updates: the update at \['w'\] has dtype float8"
    ):
        rj.apply_updates({"w": jnp.ones(3)}, {"w": jnp.ones(3, jnp.float8_e5m2)})


def test_weight_decay_of_a_complex_parameter_keeps_its_imaginary_part():
    import optax

    params = {"w": jnp.array([1j, 2j], jnp.complex64)}
    grads = {"w": jnp.ones(2)}
    ours = rj.add_decayed_weights(0.1).update(grads, rj.EmptyState(), params)[0]
    theirs = optax.add_decayed_weights(0.1).update(grads, optax.EmptyState(), params)[0]
    chex.assert_trees_all_equal(ours, theirs)


def test_a_complex_accumulator_for_a_real_parameter_is_refused_at_init():
    params = {"w": jnp.ones(2)}
    for tx in (
        rj.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.complex64),
        rj.ema(0.9, accumulator_dtype=jnp.complex64),
        rj.accumulate_gradients(rj.sgd(0.1), 2, accumulator_dtype=jnp.complex64),
    ):
        with pytest.raises(TypeError, match=r"accumulator_dtype must be a real dtype or None"):
            tx.init(params)


@pytest.mark.parametrize(
    "value, error",
    [
        (True, TypeError),
        (1e-46, ValueError),
        ("0.1", TypeError),
        (None, TypeError),
        (0.1 + 1j, TypeError),
    ],
)
def test_hyperparams_replaced_by_a_plain_dict_are_checked_as_set_ones_are(value, error):
    # state._replace(hyperparams={...}) skipped every check: True stepped as a rate of 1
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
    tx = rj.inject_hyperparams(rj.rmsprop)(0.1)
    state = tx.init(params)
    bad = state._replace(hyperparams={**state.hyperparams, "learning_rate": value})
    with pytest.raises(
        error, match=r"^rmsjax\.inject_hyperparams: state\.hyperparams\['learning_rate'\]"
    ):
        tx.update(grads, bad, params)
    missing = state._replace(hyperparams={k: v for k, v in state.hyperparams.items() if k != "eps"})
    with pytest.raises(KeyError, match=r"state.hyperparams lacks \['eps'\]"):
        tx.update(grads, missing, params)
    good = state._replace(hyperparams={**state.hyperparams, "learning_rate": 0.05})
    expected = tx.update(grads, state._replace(hyperparams=_with_rate(state, 0.05)), params)[0]
    chex.assert_trees_all_close(tx.update(grads, good, params)[0], expected)


@pytest.mark.parametrize(
    "value, error, traced_too",
    [
        (True, TypeError, True),
        (0.1 + 1j, TypeError, True),
        (jnp.ones(3), ValueError, True),
        (1e-46, ValueError, False),  # under jit a traced value: only its shape and dtype
        ("0.1", TypeError, False),  # (jit itself refuses a string argument)
        (None, TypeError, True),
    ],
)
def test_hyperparams_set_by_optax_tree_set_are_checked_as_set_ones_are(value, error, traced_too):
    # porting.md points optax users to tree_set, which rebuilds the dict and skipped every
    # check: True stepped as a rate of 1, 1j as 0 under jit, a (3,) rate was broadcast
    import optax.tree_utils as otu

    params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
    tx = rj.inject_hyperparams(rj.rmsprop)(0.1, momentum=0.9)
    bad = otu.tree_set(tx.init(params), learning_rate=value)
    says = r"^rmsjax\.inject_hyperparams: state\.hyperparams\['learning_rate'\]"
    with pytest.raises(error, match=says):
        tx.update(grads, bad, params)
    if traced_too:
        with pytest.raises(error, match=says):
            jax.jit(tx.update)(grads, bad, params)
    good = otu.tree_set(tx.init(params), learning_rate=0.05)
    expected = tx.update(
        grads, tx.init(params)._replace(hyperparams=_with_rate(good, 0.05)), params
    )
    chex.assert_trees_all_equal(jax.jit(tx.update)(grads, good, params), expected)


def test_a_hyperparameter_the_state_s_dtype_cannot_hold_is_refused_where_given():
    # 1e5 in float16 was stored as inf and stepped by -inf; at init the message showed
    # the rounded inf, not the number given, and did not name hyperparam_dtype
    params = jnp.ones(3)
    half = rj.inject_hyperparams(rj.rmsprop, hyperparam_dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"\.init: learning_rate is 100000\.0, which is inf in "):
        half(learning_rate=1e5, eps=1e-3).init(params)
    state = half(learning_rate=0.1, eps=1e-3).init(params)
    with pytest.raises(
        ValueError, match=r"\['learning_rate'\] is 70000\.0, which is inf in float16"
    ):
        state.hyperparams["learning_rate"] = 7e4
    assert float(state.hyperparams["learning_rate"]) == np.float16(0.1)  # unchanged
    state.hyperparams["learning_rate"] = 6e4  # float16 holds it


def test_inject_hyperparams_names_a_schedule_that_cannot_take_the_count():
    for schedule in (lambda: 0.1, lambda count, other: 0.1, lambda *, count: 0.1):
        with pytest.raises(
            TypeError,
            match=r"^rmsjax\.inject_hyperparams\(rmsprop\): learning_rate must be a number or "
            r"a schedule, a function of the step count \(one argument\), got <lambda>\(.*"
            r"a function that is no schedule goes in static_args=\('learning_rate',\)",
        ):
            rj.inject_hyperparams(rj.rmsprop)(learning_rate=schedule)


def test_inject_hyperparams_checks_its_own_count():
    # a float count was taken (the step handed back an int32 one, another structure);
    # a vector of counts blamed the schedule
    params = jnp.ones(3)
    tx = rj.inject_hyperparams(rj.rmsprop)(rj.schedules.linear_schedule(0.1, 0.0, 10))
    state = tx.init(params)
    with pytest.raises(
        TypeError,
        match=r"^rmsjax\.inject_hyperparams\(rmsprop\)\.update: the state's count must be an int",
    ):
        tx.update(params, state._replace(count=jnp.float32(3.0)), params)
    with pytest.raises(ValueError, match=r"count must be a scalar, got an array of shape \(2,\)"):
        tx.update(params, state._replace(count=jnp.array([1, 2])), params)


def _with_rate(state, rate):
    hyperparams = rj.Hyperparams(state.hyperparams)
    hyperparams["learning_rate"] = rate
    return hyperparams


@pytest.mark.parametrize("option", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_keras_clipping_options_must_exceed_0_in_float32(option):
    # (any value over 0 is refused with the composition to write instead; 1e-46 is 0,
    # which Keras takes as no clipping, but float32 is not what the caller wrote)
    with pytest.raises(ValueError, match=rf"{option} must be > 0 in float32.*got 1e-46$"):
        rj.compat.keras_rmsprop(0.1, **{option: 1e-46})
    with pytest.raises(ValueError, match=r"compose rj\.chain\("):
        rj.compat.keras_rmsprop(0.1, **{option: 1e-45})


def test_a_weight_decay_mask_of_another_tree_is_refused_at_init_as_masked_s_is():
    # it was refused only at the first update, though init checks the mask
    params = {"w": jnp.ones(2), "b": jnp.ones(3)}
    for tx, function in (
        (rj.add_decayed_weights(0.1, mask={"w": True}), "add_decayed_weights"),
        (rj.masked(rj.sgd(0.1), {"w": True}), "masked"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"^rmsjax\.{function}: the mask's tree structure must be the parameters' "
            r"\(or a prefix of it\); at the root: \['b'\] only in the parameters",
        ):
            tx.init(params)
    tx = rj.add_decayed_weights(0.1, mask={"w": True, "b": False})
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], 1.1)
    np.testing.assert_allclose(updates["b"], 1.0)


def test_nesterov_with_a_momentum_of_zero_is_taken_as_optax_takes_it():
    params, grads = jnp.array([1.0, -2.0]), jnp.array([0.3, -0.7])
    ours, theirs = (
        rj.rmsprop(0.1, momentum=0.0, nesterov=True),
        optax.rmsprop(0.1, momentum=0.0, nesterov=True),
    )
    state, their_state = ours.init(params), theirs.init(params)
    for _ in range(3):
        updates, state = ours.update(grads, state, params)
        expected, their_state = theirs.update(grads, their_state, params)
        np.testing.assert_allclose(updates, expected, rtol=1e-6)


def test_step_bounds_hold_in_float32_and_round_to_the_parameter_s_dtype():
    # docs/numerics.md, "Bounded steps": the bound of the float32 step, rounded to a
    # float16 parameter's dtype; a rate whose bound passes float32's largest is infinite
    grads = jnp.array([3e4, 6e4, -1e3], jnp.float16)
    updates, _ = rj.adagrad(0.01).update(grads, rj.adagrad(0.01).init(grads), grads)
    assert updates.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(updates), np.float16(-0.01) * np.sign(grads))
    assert float(np.float16(-0.01)) < -0.01  # 0.0100021: past the float32 bound
    tx = rj.rmsprop(3.4e38)  # accepted: finite in float32
    updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    np.testing.assert_array_equal(np.asarray(updates), -np.inf)  # 3.4e38 / sqrt(0.1)
    tx = rj.rmsprop(1.07e38)  # under the bound: finite
    updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    assert np.all(np.isfinite(np.asarray(updates)))
