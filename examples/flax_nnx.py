"""rmsjax inside a flax nnx training loop.

``nnx.Optimizer`` takes an rmsjax transformation as it is: it only calls ``init`` and
``update``. (Wrap it with ``rj.as_optax`` for code that checks ``isinstance`` against
optax's types; the numbers are the same.) This script fits a small MLP to a noisy sine
with

    tx = rj.apply_if_finite(
        rj.chain(rj.clip_by_global_norm(1.0), rj.inject_hyperparams(rj.rmsprop)(3e-3)),
        max_consecutive_errors=5,
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

halves the learning rate in the optimizer state half-way through (no recompilation),
and writes ``flax_nnx_fit.png``: the data, the fit at a few steps and the loss.

Usage::

    python examples/flax_nnx.py [--quick] [--out out/flax_nnx]

Needs flax (``pip install -e ".[examples]"`` in a checkout).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

import rmsjax as rj


class MLP(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(1, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.hidden1(x))
        x = jnp.tanh(self.hidden2(x))
        return self.out(x)


def make_data(n: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-2, 2, size=(n, 1)), axis=0)
    y = np.sin(3 * x) + 0.1 * rng.normal(size=(n, 1))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def make_optimizer(learning_rate: float) -> rj.GradientTransformation:
    return rj.apply_if_finite(
        rj.chain(
            rj.clip_by_global_norm(1.0),
            rj.inject_hyperparams(rj.rmsprop)(learning_rate=learning_rate),
        ),
        max_consecutive_errors=5,
    )


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def set_learning_rate(optimizer: nnx.Optimizer, value: float) -> None:
    """Writes a new learning rate into the rmsjax state held by the nnx optimizer."""
    guard = optimizer.opt_state  # nnx wraps each array of the state in an OptState
    injected = guard.inner_state[1]
    injected.hyperparams["learning_rate"][...] = jnp.asarray(value, jnp.float32)


def learning_rate(optimizer: nnx.Optimizer) -> float:
    return float(optimizer.opt_state.inner_state[1].hyperparams["learning_rate"][...])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/flax_nnx"),
        help="folder for its pictures (default out/flax_nnx)",
    )
    args = parser.parse_args(argv)
    steps = 30 if args.quick else 2000
    began = time.perf_counter()

    x, y = make_data()
    model = MLP(64, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(3e-3), wrt=nnx.Param)
    snapshots = {0: np.asarray(model(x))}
    losses = []
    for step in range(1, steps + 1):
        if step == steps // 2:
            set_learning_rate(optimizer, learning_rate(optimizer) / 2)
        losses.append(float(train_step(model, optimizer, x, y)))
        if step in (steps // 20, steps // 4, steps):
            snapshots[step] = np.asarray(model(x))
    print(f"loss at the start {losses[0]:.4f}, after {steps - 1} steps {losses[-1]:.4f}")
    print(f"learning rate now {learning_rate(optimizer):.2e} (halved at step {steps // 2})")
    print(f"skipped non-finite steps: {int(optimizer.opt_state.total_notfinite[...])}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "flax_nnx_fit.png"
        plot(plt, x, y, snapshots, losses, steps, path, "flax nnx MLP + rmsjax RMSprop")
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return {"losses": losses}


def plot(plt, x, y, snapshots, losses, steps, path, title):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    left.plot(x[:, 0], y[:, 0], ".", color="0.6", ms=3, label="data: sin(3x) + noise")
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(snapshots)))
    for (step, prediction), color in zip(snapshots.items(), colors, strict=True):
        left.plot(x[:, 0], prediction[:, 0], color=color, lw=1.8, label=f"step {step}")
    left.set(xlabel="x", ylabel="y", title="the fit as training proceeds")
    # Below the axes, where it covers neither the data nor the fits.
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    right.semilogy(np.arange(1, len(losses) + 1), losses, color="tab:blue")
    right.axvline(steps // 2, color="0.5", ls=":", lw=1, label="learning rate halved")
    right.set(xlabel="step", ylabel="mean squared error (log scale)", title="training loss")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
