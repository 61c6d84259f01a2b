"""The report of a full speed run (``run.py``): the machine it ran on, the plot of step
and compile time against leaf count, and the speed section of ``RESULTS.md``."""

from __future__ import annotations

import datetime
import os
import statistics

import jax
import numpy as np
import results_file
from speed_contenders import ALGORITHMS, FLOOR, STACKED
from speed_measure import TORCH_EVERY, Row
from speed_tables import kernel_traffic, layout_cost, table, targets


def machine_lines(rows: list[Row], stream_elements: int) -> list[str]:
    speeds = [row.stream_gbs for row in rows]
    return [
        *results_file.machine_lines(),
        f"- Streaming bandwidth (donated `a * s + b`, {stream_elements / 2**20:.0f}M float32, "
        "12 bytes per element, timed in every row in turn with the contenders): median "
        f"**{statistics.median(speeds):.1f} GB/s** over the rows, from {min(speeds):.1f} to "
        f"{max(speeds):.1f}; each row's bandwidth fractions use that row's own figure.",
    ]


def plot(rows: list[Row], names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algorithms = [a for a in ALGORITHMS if any(r.algorithm == a for r in rows)]
    figure, axes = plt.subplots(2, len(algorithms), figsize=(5 * len(algorithms), 8), squeeze=False)
    styles = {
        "optax": "o-",
        "rmsjax": "s--",
        "rmsjax.grouped": "D-",
        FLOOR: "k:",
        STACKED: "x:",
        "torch-foreach": "^:",
        "torch-fused": "v:",
    }
    for column, algorithm in enumerate(algorithms):
        subset = sorted((r for r in rows if r.algorithm == algorithm), key=lambda r: r.count)
        counts = [r.count for r in subset]
        for name in names:
            step = [r.step_ms.get(name, np.nan) for r in subset]
            axes[0][column].plot(counts, step, styles.get(name, ".-"), label=name)
            if not name.startswith("torch"):
                compile_s = [r.compile_s.get(name, np.nan) for r in subset]
                axes[1][column].plot(counts, compile_s, styles.get(name, ".-"), label=name)
        for ax, what in ((axes[0][column], "step time (ms)"), (axes[1][column], "compile (s)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("number of leaves")
            ax.set_ylabel(what)
            ax.set_title(ALGORITHMS[algorithm]["label"])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    shapes = ", ".join(dict.fromkeys(r.shape for r in rows))
    figure.suptitle(
        f"Optimizer step, jitted with donated buffers ({jax.default_backend()}): {shapes}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(
    path: str,
    rows: list[Row],
    names: list[str],
    stream_elements: int,
    command: str,
    rounds: int,
    compile_repeats: int,
    with_torch: bool,
    started: datetime.datetime,
    elapsed: float,
    plot_name: str,
) -> None:
    lines = [
        "# Speed: step and compile time against optax",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `{command}` in {elapsed / 60:.1f} minutes "
        "(the file is rewritten by each full run).",
        "",
        *machine_lines(rows, stream_elements),
        f"- Steps: median of {rounds} single calls per contender (torch, a slow reference, "
        f"in one round of {TORCH_EVERY}: {rounds // TORCH_EVERY} calls), the contenders "
        "called in turn in a rotating order; parameters and state donated; the gradients "
        "fixed. "
        f"Compile: median of {compile_repeats} (trace + lower + XLA compile of a fresh "
        "function after `jax.clear_caches()`).",
        "- Bandwidth: bytes the step must move (float32 parameters, gradients and state "
        "read; parameters and state written: 20 bytes per parameter for rmsprop and "
        "adagrad, 28 with momentum) over the median step time, as a fraction of the "
        "row's streaming bandwidth.",
        "- Absolute times on this kind of machine move by 15-20% or more between runs; "
        "compare the ratios, which come from one process with the contenders alternated.",
    ]
    missing = sorted(
        {ALGORITHMS[r.algorithm]["label"] for r in rows if "torch-fused" not in r.step_ms}
    )
    if with_torch and missing:
        lines.append(
            f"- torch-fused is missing for {', '.join(missing)}: this torch version has no "
            "`fused` implementation of that optimizer."
        )
    if not with_torch:
        lines.append(
            "- torch.optim was not measured in this run (torch is not installed, or "
            "`--no-torch` was given); install torch and rerun to add `torch-foreach` and "
            "`torch-fused`."
        )
    if jax.default_backend() == "cpu":
        lines.append(
            "- GPU: not measured (JAX's backend was the CPU); the same command measures the "
            "GPU when JAX's default backend is one."
        )
    lines += [
        "",
        "## Step and compile time",
        "",
        "Ratios below 1 mean faster than optax.",
        "",
        *table(rows, names),
        "",
        f"![step and compile time against leaf count]({plot_name})",
        "",
        *kernel_traffic(rows),
        "## Targets, on this run",
        "",
        *targets(rows, "rmsjax.grouped"),
        "",
        *targets(rows, "rmsjax"),
        "",
        *layout_cost(rows),
        "*Best possible here*, an estimate from the same run: on one leaf, the share of "
        "the streaming bandwidth the step reaches if its compiled kernels run at the "
        "streaming rate (XLA CPU writes each output with its own kernel, see above); on "
        "many leaves, the `floor`'s step time plus the time the algorithm's extra bytes "
        "(8 per parameter for rmsprop and adagrad, 16 with momentum) take at the streaming "
        "rate, and the floor's compile time, as ratios to optax. It is an estimate, not a "
        "proof (a measurement can land a few percent past it, as timings move by 15-20% "
        "here), but a target well beyond it cannot be met on this machine by an optimizer "
        "that takes and returns these per-leaf pytrees.",
        "",
        "`rmsjax` keeps one state array per parameter leaf (the layout every rmsjax "
        "transformation has by default); `rmsjax.grouped` wraps the same optimizer in "
        "`rj.grouped(...)`, which keeps the state in blocks of same-shaped leaves. Both "
        "give optax's numbers, bit for bit but for an ulp or two in a few kernels where XLA "
        "contracts a product and a sum differently (tests/test_fusion.py, "
        "docs/performance.md). `floor` is no optimizer: it steps every leaf by "
        "`p - lr * g` and keeps no state, in the same jitted, donated call, so no optimizer "
        "taking and returning these per-leaf pytrees can be faster here by more than the "
        "timing noise. `stacked` is no optimizer to use either: `rmsjax.grouped`'s blocks "
        "with optax's arithmetic and nothing else (a moment past float32's range is lost, "
        "as in optax). docs/performance.md explains where the time goes.",
        "",
    ]
    if os.path.abspath(path) == str(results_file.RESULTS):
        results_file.write_section("speed", "\n".join(lines))
    else:
        with open(path, "w") as handle:
            handle.write("\n".join(lines))
