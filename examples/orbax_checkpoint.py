"""Checkpoint an rmsjax optimizer with orbax, restore it into an abstract target, and
resume bit for bit.

An rmsjax state is a pytree of NamedTuples, dicts and arrays, so orbax saves it as it
is. To restore, build the target's *shapes* without computing anything::

    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))

and orbax hands back the same NamedTuple types (``ApplyIfFiniteState``,
``InjectHyperparamsState``, ``ScaleByRmsState``, ...), with the same dtypes.

The script trains a small regression network for N steps without a break, then again
with a save at N/2, a fresh optimizer object, a restore and N/2 more steps, and checks
that the two runs end with bit-identical parameters and optimizer state. It writes
``orbax_resume.png``: both loss curves, and the largest absolute difference between the
two runs' parameters at each step after the restore (zero throughout).

Usage::

    python examples/orbax_checkpoint.py [--quick] [--out out/orbax_checkpoint]

Needs orbax-checkpoint (``pip install -e ".[examples]"`` in a checkout).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import rmsjax as rj


def make_data(n: int = 512, features: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    y = np.sin(x @ rng.normal(size=features)) + 0.05 * rng.normal(size=n)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def init_params(features: int = 6, hidden: int = 32):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "hidden": {"w": jax.random.normal(k1, (features, hidden)) / 3, "b": jnp.zeros(hidden)},
        "out": {"w": jax.random.normal(k2, (hidden,)) / 6, "b": jnp.zeros(())},
    }


def make_optimizer() -> rj.GradientTransformation:
    """A state with a bit of everything: counters, bools, a dict of hyperparameters."""
    return rj.apply_if_finite(
        rj.chain(
            rj.clip_by_global_norm(1.0),
            rj.add_decayed_weights(1e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
            rj.inject_hyperparams(rj.rmsprop)(learning_rate=3e-3, momentum=0.9),
        ),
        max_consecutive_errors=3,
    )


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return jnp.mean((h @ params["out"]["w"] + params["out"]["b"] - y) ** 2)


def make_step(tx, x, y, batch=64):
    @jax.jit
    def step(params, state, t):
        # The minibatch is a function of the step number, so a resumed run sees the
        # same batches as an uninterrupted one.
        rows = jax.random.choice(jax.random.fold_in(jax.random.key(1), t), x.shape[0], (batch,))
        loss, grads = jax.value_and_grad(loss_fn)(params, x[rows], y[rows])
        updates, state = tx.update(grads, state, params)
        return rj.apply_updates(params, updates), state, loss

    return step


def run(step, params, state, first, last, trace):
    for t in range(first, last):
        params, state, loss = step(params, state, t)
        trace.append((t, float(loss), params))
    return params, state


def trees_bit_identical(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(
        np.asarray(u).dtype == np.asarray(v).dtype
        and np.asarray(u).tobytes() == np.asarray(v).tobytes()
        for u, v in zip(leaves_a, leaves_b, strict=True)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/orbax_checkpoint"),
        help="folder for its pictures (default out/orbax_checkpoint)",
    )
    args = parser.parse_args(argv)
    steps = 20 if args.quick else 400
    half = steps // 2
    began = time.perf_counter()
    x, y = make_data()

    # 1. The uninterrupted run.
    tx = make_optimizer()
    params = init_params()
    straight: list = []
    final_params, final_state = run(
        make_step(tx, x, y), params, tx.init(params), 0, steps, straight
    )

    # 2. The same run, saved half-way.
    directory = (args.out / "checkpoints").resolve()
    shutil.rmtree(directory, ignore_errors=True)
    resumed: list = []
    mid_params, mid_state = run(make_step(tx, x, y), params, tx.init(params), 0, half, resumed)
    with ocp.CheckpointManager(directory) as manager:
        manager.save(
            half, args=ocp.args.StandardSave({"params": mid_params, "opt_state": mid_state})
        )
        manager.wait_until_finished()
    del mid_params, mid_state, tx

    # 3. A "new process": a fresh optimizer, an abstract target, restore, go on.
    tx = make_optimizer()
    abstract = jax.eval_shape(
        lambda: {"params": init_params(), "opt_state": tx.init(init_params())}
    )
    with ocp.CheckpointManager(directory) as manager:
        latest = manager.latest_step()
        restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    print(f"restored step {latest}: opt_state is of type {type(restored['opt_state']).__name__}")
    resumed_params, resumed_state = run(
        make_step(tx, x, y), restored["params"], restored["opt_state"], latest, steps, resumed
    )

    identical = trees_bit_identical(
        {"params": final_params, "opt_state": final_state},
        {"params": resumed_params, "opt_state": resumed_state},
    )
    differences = [
        max(
            float(jnp.max(jnp.abs(u - v)))
            for u, v in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2]), strict=True)
        )
        for a, b in zip(straight[half:], resumed[half:], strict=True)
    ]
    print(f"final loss: uninterrupted {straight[-1][1]:.6f}, resumed {resumed[-1][1]:.6f}")
    print(f"parameters and optimizer state bit-identical after {steps} steps: {identical}")
    print(f"largest parameter difference after the restore: {max(differences):.3g}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        path = args.out / "orbax_resume.png"
        plot(plt, straight, resumed, differences, half, identical, path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return {"identical": identical, "differences": differences}


def plot(plt, straight, resumed, differences, half, identical, path):
    # Constrained layout, with a gap, keeps the right panel's y label clear of the left panel.
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    fig.get_layout_engine().set(wspace=0.08)
    left.semilogy(
        [t for t, _, _ in straight],
        [loss for _, loss, _ in straight],
        color="tab:blue",
        lw=3,
        alpha=0.45,
        label="uninterrupted run",
    )
    left.semilogy(
        [t for t, _, _ in resumed],
        [loss for _, loss, _ in resumed],
        color="black",
        lw=1,
        ls="--",
        label="saved, restored, resumed",
    )
    left.axvline(half, color="tab:red", ls=":", lw=1.2, label=f"checkpoint at step {half}")
    left.set(xlabel="step", ylabel="minibatch loss (log scale)", title="the two runs' losses")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    steps = np.arange(half, half + len(differences))
    right.plot(steps, differences, "o-", color="tab:green", ms=3)
    # symlog: zero sits on the axis, and a difference of even 1e-9 would stand out
    right.set_yscale("symlog", linthresh=1e-10)
    right.set_ylim(-1e-10, max(1.0, 10 * float(np.max(differences))))
    right.set(
        xlabel="step",
        ylabel="largest |parameter difference|\nuninterrupted vs resumed",
        title=f"difference after the restore (bit-identical: {identical})",
    )
    right.grid(True, alpha=0.3)
    fig.suptitle("orbax checkpoint of an rmsjax state: resuming changes nothing")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)  # a resumed run that differs is a failure
