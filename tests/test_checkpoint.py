"""Checkpoint round trips: a restored state continues bit-identically."""

from __future__ import annotations

import copy
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmsjax as rj
from tests import registry, trees

OPTIMIZERS = registry.cases("checkpoint")
# Every state type of every rule, storage option and wrapper, for orbax: each must
# save (no zero-size arrays), restore into an abstract target and continue bit for bit.
EVERY_STATE = registry.cases("state")


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
    tx = OPTIMIZERS[name].make(rj)

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


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("name", EVERY_STATE)
def test_pickle_and_deepcopy_round_trip(name, how):
    # a state pickled (a checkpoint of Python objects) or deep-copied continues bit for
    # bit with its types; injected hyperparameters failed both (their dict refused
    # entries set one by one into an empty copy)
    tx = EVERY_STATE[name].make(rj)

    def save_and_restore(p, s, template):
        if how == "pickle":
            return pickle.loads(pickle.dumps((p, s)))
        return copy.deepcopy((p, s))

    _split_run(tx, save_and_restore)


def test_injected_hyperparameters_update_as_they_are_set():
    state = rj.inject_hyperparams(rj.rmsprop)(learning_rate=0.1).init(jnp.ones(3))
    state.hyperparams.update(learning_rate=1, decay=np.float64(0.5))
    assert (
        state.hyperparams["learning_rate"].dtype == state.hyperparams["decay"].dtype == jnp.float32
    )
    with pytest.raises(KeyError, match="no entry 'lr'"):
        state.hyperparams.update({"learning_rate": 0.2, "lr": 0.1})
    assert float(state.hyperparams["learning_rate"]) == 1.0  # nothing set by a refused update


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_STATE)
def test_orbax_round_trip_with_abstract_target(name, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint", reason="orbax is in the examples extra")
    tx = EVERY_STATE[name].make(rj)

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
