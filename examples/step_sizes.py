"""Each weight gets its own learning rate: effective step sizes, logged at every step.

A small two-layer network learns a regression whose 8 input features have scales from
0.1 to 1000. The gradient of a first-layer weight is proportional to its input's scale,
so plain gradient descent would need a different learning rate for each feature. RMSprop
and Adagrad divide by the root of each weight's own squared-gradient statistic ``v``.
``rmsjax.step_size_summary(tx, state, params)`` measures how far the next step moves each
weight per unit of its gradient (``lr / sqrt(v + eps)``, with RMSprop's next ``v``)
inside the jitted step (a few scalars per parameter array, cheap enough to log at every
step), and this script plots:

* the effective step size of each parameter array over training (geometric mean, and
  a band from min to max): Adagrad's only shrink, RMSprop's settle and follow the
  recent gradients;
* each first-layer weight's step size against its input feature's scale at the end:
  falling about as 1 / scale (a fitted log-log slope near -1; the run prints it), the
  per-feature learning rate nobody had to tune.

Usage::

    python examples/step_sizes.py [--quick] [--out out/step_sizes]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax as rj

FEATURES, HIDDEN = 8, 16
SCALES = np.logspace(-1, 3, FEATURES)  # the scale of each input feature


def make_data(examples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(examples, FEATURES))
    y = np.tanh(z @ rng.normal(size=FEATURES) / np.sqrt(FEATURES)) + 0.05 * rng.normal(
        size=examples
    )
    # Inputs on wildly different scales; the target depends on all of them equally.
    return jnp.asarray(z * SCALES, jnp.float32), jnp.asarray(y, jnp.float32)


def init_params(seed: int = 1) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "hidden": {
            # Scaled so that every feature enters the tanh at about unit size.
            "w": jax.random.normal(k1, (FEATURES, HIDDEN))
            / (np.sqrt(FEATURES) * jnp.asarray(SCALES, jnp.float32)[:, None]),
            "b": jnp.zeros(HIDDEN),
        },
        "out": {"w": jax.random.normal(k2, (HIDDEN,)) / np.sqrt(HIDDEN), "b": jnp.zeros(())},
    }


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return jnp.mean((h @ params["out"]["w"] + params["out"]["b"] - y) ** 2)


def train(tx, x, y, steps, batch, seed=0):
    """Minibatch training; returns the losses, the per-step summaries, the state and the
    trained parameters."""
    params = init_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        rows = jax.random.choice(key, x.shape[0], (batch,), replace=False)
        loss, grads = jax.value_and_grad(loss_fn)(params, x[rows], y[rows])
        updates, state = tx.update(grads, state, params)
        summary = rj.step_size_summary(tx, state, params)  # the next step's sizes
        return rj.apply_updates(params, updates), state, loss, summary

    keys = jax.random.split(jax.random.key(seed), steps)
    losses, summaries = [], []
    for key in keys:
        params, state, loss, summary = step(params, state, key)
        losses.append(loss)
        summaries.append(summary)
    # Stack the per-step summaries into arrays of shape (steps,) per leaf and field.
    history = jax.tree.map(lambda *xs: np.stack(xs), *summaries)
    return np.asarray(losses), history, state, params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out/step_sizes"),
        help="folder for its pictures (default out/step_sizes)",
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()

    steps = 40 if args.quick else 600
    x, y = make_data(2048)
    runs = {"rmsprop": rj.rmsprop(1e-3, decay=0.99), "adagrad": rj.adagrad(3e-2)}
    results = {}
    print(f"{'optimizer':<10}{'loss first 10':>15}{'loss last 10':>15}")
    for name, tx in runs.items():
        losses, history, state, params = train(tx, x, y, steps, batch=64)
        sizes = rj.effective_step_sizes(tx, state, params)
        results[name] = (losses, history, sizes)
        print(f"{name:<10}{losses[:10].mean():>15.4f}{losses[-10:].mean():>15.4f}")

    # Per input feature: the geometric mean over hidden units of the first-layer sizes.
    per_feature = np.exp(np.log(np.asarray(results["rmsprop"][2]["hidden"]["w"])).mean(axis=1))
    slope = np.polyfit(np.log10(SCALES), np.log10(per_feature), 1)[0]
    print(f"\nRMSprop first-layer step size vs feature scale: log-log slope {slope:.2f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "step_sizes.png"
        plot(plt, results, per_feature, slope, path)
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return {"slope": slope, "results": results}


LEAVES = [("hidden", "w"), ("hidden", "b"), ("out", "w"), ("out", "b")]
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]


def plot(plt, results, per_feature, slope, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, name in zip(axes[:2], ["rmsprop", "adagrad"], strict=True):
        history = results[name][1]
        for (layer, leaf), color in zip(LEAVES, COLORS, strict=True):
            summary = history[layer][leaf]
            steps = np.arange(1, len(summary.min) + 1)
            ax.fill_between(steps, summary.min, summary.max, color=color, alpha=0.15, lw=0)
            ax.semilogy(steps, summary.geometric_mean, color=color, label=f"{layer}.{leaf}")
        ax.set(
            xlabel="step",
            ylabel="step per unit of gradient",
            title=f"{name}: effective step size per array (band: min-max)",
        )
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    ax = axes[2]
    ax.loglog(SCALES, per_feature, "o-", color="tab:blue", label="rmsprop, after training")
    middle = FEATURES // 2
    reference = per_feature[middle] * (SCALES / SCALES[middle]) ** -1.0
    ax.loglog(SCALES, reference, "k--", lw=1, label="slope -1 (step size ~ 1 / scale)")
    ceiling = 1e-3 / np.sqrt(1e-8)
    ax.axhline(ceiling, color="0.5", ls=":", lw=1, label="lr / sqrt(eps): the ceiling eps sets")
    ax.set(
        xlabel="scale of the input feature",
        ylabel="step size of its first-layer weights",
        title=f"each weight its own learning rate (fitted slope {slope:.2f})",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
