"""Checkpoint round trips: a restored state continues bit-identically."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from tests import trees

OPTIMIZERS = {
    "rmsprop-centered-momentum": lambda: rj.rmsprop(
        rj.schedules.cosine_decay_schedule(1e-2, 50), centered=True, momentum=0.9
    ),
    "adagrad": lambda: rj.adagrad(0.1),
    "clipped-rmsprop": lambda: rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(1e-2)),
}

# Every state type of every rule, storage option and wrapper, for orbax: each must
# save (no zero-size arrays), restore into an abstract target and continue bit for bit.
EVERY_STATE = {
    **OPTIMIZERS,
    "rmsprop-bias-nesterov": lambda: rj.rmsprop(
        1e-2, bias_correction=True, momentum=0.9, nesterov=True
    ),
    "sgd-momentum": lambda: rj.sgd(0.1, momentum=0.9),
    "ema": lambda: rj.chain(rj.ema(0.9), rj.scale(-0.1)),
    "int8": lambda: rj.rmsprop(1e-2, momentum=0.9, centered=True, storage="int8"),
    "bfloat16": lambda: rj.adagrad(0.1, storage="bfloat16"),
    "float32-trace": lambda: rj.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.float32),
    "rowwise": lambda: rj.rowwise_adagrad(0.1),
    "factored": lambda: rj.factored_rmsprop(1e-2, min_dim_size_to_factor=2),
    "factored-momentum": lambda: rj.factored_rmsprop(1e-2, momentum=0.9, min_dim_size_to_factor=2),
    "masked": lambda: rj.chain(
        rj.masked(rj.adagrad(0.1), {"scalar": True, "dense": False, "nested": True}),
        rj.add_decayed_weights(1e-3, mask={"scalar": False, "dense": True, "nested": True}),
    ),
    "apply_if_finite": lambda: rj.apply_if_finite(rj.rmsprop(1e-2), 3),
    "inject_hyperparams": lambda: rj.inject_hyperparams(rj.rmsprop)(
        learning_rate=rj.schedules.linear_schedule(1e-2, 1e-3, 10), decay=0.9, momentum=0.9
    ),
    "accumulate_gradients": lambda: rj.accumulate_gradients(rj.adagrad(0.1), 2),
    "grouped": lambda: rj.grouped(rj.rmsprop(1e-2, momentum=0.9)),
}


def _run(tx, params, state, grads):
    step = jax.jit(lambda p, s, g: rj.update_and_apply(tx, g, s, p))
    for g in grads:
        params, state = step(params, state, g)
    return params, state


def _split_run(tx, save_and_restore, params=None):
    params = trees.mixed_params() if params is None else params
    grads = trees.gradient_sequence(params, 12, seed=11)
    straight = _run(tx, params, tx.init(params), grads)
    p, s = _run(tx, params, tx.init(params), grads[:6])
    p, s = save_and_restore(p, s, params)
    resumed = _run(tx, p, s, grads[6:])
    chex.assert_trees_all_equal(straight, resumed)
    chex.assert_trees_all_equal_dtypes(straight, resumed)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_numpy_savez_round_trip(name, tmp_path):
    tx = OPTIMIZERS[name]()

    def save_and_restore(p, s, template):
        leaves = jax.tree.leaves((p, s))
        np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
        del p, s
        # restore into the structure of a fresh init: nothing of the old state is reused
        treedef = jax.tree.structure((template, jax.eval_shape(tx.init, template)))
        with np.load(tmp_path / "ckpt.npz") as data:
            loaded = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(data.files))]
        return treedef.unflatten(loaded)

    _split_run(tx, save_and_restore)


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_STATE)
def test_orbax_round_trip_with_abstract_target(name, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint", reason="orbax is in the examples extra")
    tx = EVERY_STATE[name]()

    def save_and_restore(p, s, template):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
            checkpointer.wait_until_finished()
            abstract = {
                "params": jax.eval_shape(lambda: template),
                "opt_state": jax.eval_shape(tx.init, template),
            }
            restored = checkpointer.restore(tmp_path / "ckpt", abstract)
        return restored["params"], restored["opt_state"]

    params = trees.mixed_params()
    if name == "int8":  # a leaf large enough for 8-bit blocks (QuantizedArray state)
        params["big"] = jnp.linspace(-1.0, 1.0, 8192).reshape(64, 128)
    _split_run(tx, save_and_restore, params)
