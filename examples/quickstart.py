"""Quickstart: gradient descent, Adagrad, RMSprop and RMSprop with momentum, side by side.

Runs each optimizer on two classic 2-D problems and shows what the textbook pictures
claim, from real runs:

* an elongated quadratic bowl, ``f(x, y) = 0.05 x^2 + 5 y^2`` (curvatures 0.1 and 10):
  gradient descent must keep its step below 2/10 to stay stable in the steep direction,
  so it zig-zags across the valley and crawls along it; RMSprop divides each coordinate
  by its own root-mean-square gradient, so it steps as far along the flat direction as
  along the steep one: it drops to the valley floor without a zig-zag and runs straight
  along it to the minimum; Adagrad keeps pace early and then slows, because its sum of
  squared gradients only grows;
* the Rosenbrock function ``(1 - x)^2 + 100 (y - x^2)^2``, a curved narrow valley.

Usage::

    python examples/quickstart.py                 # full run, pictures in out/quickstart/
    python examples/quickstart.py --quick         # a smoke run of a few seconds
    python examples/quickstart.py --out some/dir  # choose the output folder

It prints a table of the loss after a few step counts and writes ``trajectories.png``
(a contour plot per problem and optimizer, with its path) and ``loss_curves.png``.
Without matplotlib it prints the table and says that the pictures were skipped.
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rmsjax as rj


class Problem(NamedTuple):
    name: str
    loss: Callable[[jax.Array], jax.Array]
    start: tuple[float, float]
    minimum: tuple[float, float]
    steps: int
    window: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max of the plot
    optimizers: dict[str, rj.GradientTransformation]


def bowl(w: jax.Array) -> jax.Array:
    """An elongated quadratic bowl: curvature 0.1 along x, 10 along y."""
    return 0.05 * w[0] ** 2 + 5.0 * w[1] ** 2


def rosenbrock(w: jax.Array) -> jax.Array:
    """Rosenbrock's banana-shaped valley, minimum 0 at (1, 1)."""
    return (1.0 - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2


def problems(quick: bool) -> list[Problem]:
    # Gradient descent gets about the largest step that is stable in the steep direction
    # (0.18 < 2/10 on the bowl). RMSprop uses decay=0.99 (torch's default) so that in its
    # first tens of steps it averages about as many squared gradients as Adagrad sums:
    # with 10x RMSprop's learning rate, Adagrad then takes the same steps, and the pictures
    # show where the two part ways, once Adagrad's ever-growing sum slows it down.
    return [
        Problem(
            name="elongated bowl",
            loss=bowl,
            start=(-8.0, 1.5),
            minimum=(0.0, 0.0),
            steps=20 if quick else 100,
            window=(-9.0, 2.0, -2.2, 2.2),
            optimizers={
                "sgd": rj.sgd(0.18),
                "adagrad": rj.adagrad(1.0),
                "rmsprop": rj.rmsprop(0.1, decay=0.99),
                "rmsprop+momentum": rj.rmsprop(0.01, decay=0.99, momentum=0.9),
            },
        ),
        Problem(
            name="Rosenbrock",
            loss=rosenbrock,
            start=(-1.2, 1.0),
            minimum=(1.0, 1.0),
            steps=50 if quick else 1000,
            window=(-1.6, 1.4, -0.4, 1.6),
            optimizers={
                "sgd": rj.sgd(1e-3),
                "adagrad": rj.adagrad(0.1),
                "rmsprop": rj.rmsprop(1e-2, decay=0.99),
                "rmsprop+momentum": rj.rmsprop(1e-3, decay=0.99, momentum=0.9),
            },
        ),
    ]


def optimize(
    tx: rj.GradientTransformation, loss: Callable, start: tuple[float, float], steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``steps`` steps of ``tx`` from ``start``; returns the path (steps + 1, 2)
    and the losses along it (steps + 1,)."""

    @jax.jit
    def run(w0):
        def step(carry, _):
            w, state = carry
            grads = jax.grad(loss)(w)
            updates, state = tx.update(grads, state, w)
            w = rj.apply_updates(w, updates)
            return (w, state), w

        _, path = jax.lax.scan(step, (w0, tx.init(w0)), None, length=steps)
        path = jnp.concatenate([w0[None], path])
        return path, jax.vmap(loss)(path)

    path, losses = run(jnp.asarray(start, jnp.float32))
    return np.asarray(path), np.asarray(losses)


def print_table(problem: Problem, results: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    quarter, half = problem.steps // 4, problem.steps // 2
    checkpoints = sorted({quarter, half, problem.steps} | ({10} if 20 <= quarter else set()))
    print(f"{problem.name} ({problem.steps} steps)")
    header = f"{'optimizer':<18}" + "".join(f"{f'step {c}':>12}" for c in checkpoints)
    print(header)
    print("-" * len(header))
    for name, (_, losses) in results.items():
        # One format for every cell, so the decimal points line up in each column.
        print(f"{name:<18}" + "".join(f"{losses[c]:>12.2e}" for c in checkpoints))
    print()


# Colour, line style and drawing order (higher on top) of each optimizer's loss curve.
STYLES = {
    "sgd": dict(color="tab:red", ls="-", lw=1.3, zorder=2),
    "adagrad": dict(color="tab:green", ls="-", lw=3.5, alpha=0.6, zorder=3),
    "rmsprop": dict(color="tab:blue", ls="-", lw=1.3, zorder=4),
    "rmsprop+momentum": dict(color="tab:purple", ls="-", lw=1.3, zorder=1),
}


def plot_trajectories(plt, all_results, all_problems, path: pathlib.Path) -> None:
    # One panel per problem and optimizer: Adagrad's path runs on top of RMSprop's for
    # most of its length, so drawn on one panel either would hide the other.
    names = list(all_problems[0].optimizers)
    fig, axes = plt.subplots(
        len(all_problems), len(names), figsize=(14, 7), layout="constrained", squeeze=False
    )
    for row, problem in zip(axes, all_problems, strict=True):
        x0, x1, y0, y1 = problem.window
        xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        zs = np.asarray(problem.loss(jnp.asarray(np.stack([xs, ys]))))
        levels = np.geomspace(max(zs.min(), 1e-3), zs.max(), 18)
        for ax, name in zip(row, names, strict=True):
            trajectory, losses = all_results[problem.name][name]
            ax.contour(xs, ys, zs, levels=levels, colors="0.8", linewidths=0.6)
            color = STYLES[name]["color"]
            ax.plot(*trajectory.T, "-", color=color, lw=1.2, marker=".", ms=3)
            ax.plot(*problem.start, "ko", ms=6)
            ax.plot(*problem.minimum, "k*", ms=13)
            ax.plot(*trajectory[-1], "o", mfc="white", mec=color, mew=1.5, ms=8)
            ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x")
            ax.set_title(f"{name}\nloss {losses[-1]:.2g} after {problem.steps} steps", fontsize=10)
        row[0].set_ylabel(f"{problem.name}\ny")
    handles = [
        plt.Line2D([], [], color="0.3", lw=1.2, marker=".", ms=5, label="path, one dot per step"),
        plt.Line2D([], [], color="k", marker="o", ls="", ms=6, label="start"),
        plt.Line2D([], [], color="k", marker="*", ls="", ms=12, label="minimum"),
        plt.Line2D([], [], color="0.3", marker="o", mfc="white", ls="", ms=8, label="last step"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9)
    fig.suptitle(
        "Each optimizer's path from the same start: elongated bowl 0.05 x^2 + 5 y^2 (top), "
        "Rosenbrock (bottom)"
    )
    fig.savefig(path, dpi=80)
    plt.close(fig)


def adagrad_versus_rmsprop(adagrad: np.ndarray, rmsprop: np.ndarray) -> str:
    """Says, from the run's numbers, how long Adagrad's loss stays within 10% of
    RMSprop's and how many times RMSprop's it is afterwards, half-way and at the end."""
    ratio = adagrad / np.maximum(rmsprop, 1e-30)
    apart = np.flatnonzero(np.abs(ratio - 1) > 0.1)
    steps = len(ratio) - 1
    if not apart.size:
        return f"Adagrad's loss within 10% of RMSprop's for all {steps} steps"
    later = [t for t in (steps // 2, steps) if t >= apart[0]]
    ratios = ", ".join(f"{ratio[t]:.2g}x at step {t}" for t in later)
    return f"Adagrad's loss within 10% of RMSprop's to step {apart[0] - 1};\nthen {ratios}"


def plot_losses(plt, all_results, all_problems, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, len(all_problems), figsize=(12, 4.4), layout="constrained")
    for ax, problem in zip(axes, all_problems, strict=True):
        results = all_results[problem.name]
        for name, (_, losses) in results.items():
            ax.semilogy(np.maximum(losses, 1e-12), label=name, **STYLES[name])
        comparison = adagrad_versus_rmsprop(results["adagrad"][1], results["rmsprop"][1])
        ax.set(xlabel="step", ylabel="loss (log scale)")
        ax.set_title(f"{problem.name}\n{comparison}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Loss per step of each optimizer, from the same start as the paths")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("out/quickstart"), help="output folder"
    )
    args = parser.parse_args(argv)

    began = time.perf_counter()
    all_problems = problems(args.quick)
    all_results: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    print("Loss after N steps (lower is better):\n")
    for problem in all_problems:
        all_results[problem.name] = {
            name: optimize(tx, problem.loss, problem.start, problem.steps)
            for name, tx in problem.optimizers.items()
        }
        print_table(problem, all_results[problem.name])

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pictures skipped (pip install matplotlib).")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_trajectories(plt, all_results, all_problems, args.out / "trajectories.png")
        plot_losses(plt, all_results, all_problems, args.out / "loss_curves.png")
        print(f"wrote {args.out / 'trajectories.png'} and {args.out / 'loss_curves.png'}")
    print(f"done in {time.perf_counter() - began:.1f} s")
    return {
        problem: {name: losses for name, (_, losses) in results.items()}
        for problem, results in all_results.items()
    }


if __name__ == "__main__":
    main()
