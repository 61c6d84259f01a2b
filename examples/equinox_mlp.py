"""rmsjax inside an equinox training loop.

Equinox models are pytrees holding arrays and other things (activation functions,
static sizes). ``eqx.filter(model, eqx.is_inexact_array)`` keeps the float arrays, None
elsewhere; rmsjax treats None leaves as "not trained" (no state, no update), so the
optimizer is initialised and stepped on the filtered model directly::

    tx = rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(3e-4, momentum=0.9))
    state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    ...
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
    model = eqx.apply_updates(model, updates)

This script fits ``eqx.nn.MLP`` to a noisy sine and writes ``equinox_fit.png``: the
data, the fit at a few steps and the training loss.

Usage::

    python examples/equinox_mlp.py [--quick] [--out out/equinox_mlp]

Needs equinox (``pip install -e ".[examples]"`` in a checkout).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import rmsjax as rj


def make_data(n: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(-2, 2, size=(n, 1)), axis=0)
    y = np.sin(3 * x) + 0.1 * rng.normal(size=(n, 1))
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def make_step(tx: rj.GradientTransformation):
    @eqx.filter_jit
    def step(model, state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/equinox_mlp"),
        help="folder for its pictures (default out/equinox_mlp)",
    )
    args = parser.parse_args(argv)
    steps = 30 if args.quick else 2000
    began = time.perf_counter()

    x, y = make_data()
    model = eqx.nn.MLP(1, 1, width_size=64, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    tx = rj.chain(rj.clip_by_global_norm(1.0), rj.rmsprop(3e-4, momentum=0.9))
    state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(tx)

    snapshots = {0: np.asarray(jax.vmap(model)(x))}
    losses = []
    for t in range(1, steps + 1):
        model, state, loss = step(model, state, x, y)
        losses.append(float(loss))
        if t in (steps // 20, steps // 4, steps):
            snapshots[t] = np.asarray(jax.vmap(model)(x))
    print(f"loss at the start {losses[0]:.4f}, after {steps - 1} steps {losses[-1]:.4f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "equinox_fit.png"
        plot(plt, x, y, snapshots, losses, path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return {"losses": losses}


def plot(plt, x, y, snapshots, losses, path):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    left.plot(x[:, 0], y[:, 0], ".", color="0.6", ms=3, label="data: sin(3x) + noise")
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(snapshots)))
    for (t, prediction), color in zip(snapshots.items(), colors, strict=True):
        left.plot(x[:, 0], prediction[:, 0], color=color, lw=1.8, label=f"step {t}")
    left.set(xlabel="x", ylabel="y", title="the fit as training proceeds")
    # Below the axes, where it covers neither the data nor the fits.
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    right.semilogy(np.arange(1, len(losses) + 1), losses, color="tab:purple")
    right.set(xlabel="step", ylabel="mean squared error (log scale)", title="training loss")
    right.grid(True, alpha=0.3)
    fig.suptitle("equinox eqx.nn.MLP + rmsjax RMSprop with momentum 0.9")
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
