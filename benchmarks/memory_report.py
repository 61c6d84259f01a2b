"""The report of ``memory.py``: the plot of the training-loss curves and the memory
section of ``RESULTS.md`` (state bytes, step time, training quality)."""

from __future__ import annotations

import datetime

import numpy as np
import results_file
from memory_options import options


def plot(results, steps, every, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    families = ["rmsprop [", "rmsprop+momentum [", "adagrad [", "rowwise|factored"]
    fig, axes = plt.subplots(1, len(families), figsize=(18, 4.5), sharey=True)
    x = np.arange(0, steps + 1, every)
    for ax, family in zip(axes, families, strict=True):
        for name, (curves, _) in results.items():
            if family == "rowwise|factored":
                keep = name in ("rowwise_adagrad", "factored_rmsprop", "adagrad [float32]")
                keep = keep or name == "rmsprop [float32]"
            else:
                keep = name.startswith(family)
            if not keep:
                continue
            mean = curves.mean(axis=0)
            style = {"[float32]": "-", "[bfloat16]": "--", "[int8]": ":"}
            line = next((v for k, v in style.items() if name.endswith(k)), "-.")
            ax.plot(x[: len(mean)], mean, line, label=name, linewidth=1.6)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(family.rstrip(" [").replace("|", " / "))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training loss (whole training set)")
    fig.suptitle("digits MLP: training loss per state storage option (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def codes_alone(row) -> str:
    ratio = row.get("codes_alone")
    return "-" if ratio is None else f"{ratio:.2f}x"


def peak_section(rows, rounds) -> list[str]:
    lines = [
        "",
        "## Peak memory and step time at scale",
        "",
        "One jitted `update_and_apply`, parameters and state donated, float32 parameters. "
        "Bytes per parameter from XLA's accounting of the compiled step "
        "(`compile().memory_analysis()`): arguments (parameters, gradients and state), "
        "temporaries, and the peak (their sum: every output is written over its donated "
        f"input). Step time: median of {rounds} single calls, the storage options of one "
        "optimizer called in turn; compile: the first `lower` + `compile`, and how far the "
        "process's peak resident memory rose above what it held before (each tree and "
        "optimizer in a process of its own; most of it stays held by the compiled step, see "
        "docs/performance.md). *Codes alone*: timed in the same rounds, the int8 state "
        "decoded and encoded again and nothing else (`quantize(dequantize(q))` for each "
        "quantized slot, jitted and donated), as a ratio to the float32-state step: an int8 "
        "step does that much beyond a float32 one, so it is a floor on this machine for the "
        "int8 step's ratio. *int8, grouped* (trees of many leaves): int8 state under "
        "`rj.grouped(..., max_stacked_size=2**30)`, which stacks same-shaped leaves in blocks"
        " of 16-32 and so compiles each block's step once, not each leaf's (see "
        "docs/performance.md, 'Compile time'). A group whose process is killed (out of "
        "memory, the int8 compile being the largest) is measured again without int8.",
        "",
        "| tree | optimizer | state | arguments B/param | temporaries B/param | "
        "peak B/param | step ms | vs float32 state | codes alone | compile s | compile GB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "failed" in row:  # the group's process did not finish
            lines.append(
                f"| {row['tree']} | {row['algorithm']} | {row['storage']} | "
                f"not measured: {row['failed']} |" + " |" * 7
            )
            continue
        lines.append(
            f"| {row['tree']} | {row['algorithm']} | {row['storage']} | "
            f"{row['arguments']:.2f} | {row['temporaries']:.2f} | {row['peak']:.2f} | "
            f"{row['step_ms']:.2f} | {row['relative']:.2f}x | {codes_alone(row)} | "
            f"{row['compile_s']:.1f} | "
            f"{row['compile_gb']:.1f} |"
        )
    lines += [
        "",
        "Targets (rmsprop + momentum): peak <= 13 B/param with bfloat16 state and <= 11 "
        "with int8 (float32 state: 16); step time <= 1.2x float32 state's with bfloat16 "
        "and <= 1.5x with int8. docs/memory.md explains the figures.",
    ]
    return lines


def write_report(path, args, count, memory, speed, peak, quality, plotted, png_name):
    lines = [
        "# Optimizer state memory: storage options, row-wise and factored state",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC with "
        "`python benchmarks/memory.py" + (" --quick" if args.quick else "") + "`.",
        "",
        *results_file.machine_lines(),
        "",
        "## State bytes per parameter",
        "",
        f"Pytree: a 50,000 x 64 embedding table and an MLP 64 -> 512 -> 512 -> 10 "
        f"({count:,} parameters, float32). int8 quantizes arrays of 4096 elements or "
        "more (the table and the two large weight matrices); smaller ones keep float32. "
        "Step counts (4-byte scalars) are left out.",
        "",
        "| option | state MiB | bytes/param | bytes/param/moment | table only: bytes/param |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in memory:
        lines.append(
            f"| {row['name']} | {row['bytes'] / 2**20:.2f} | {row['per_param']:.4f} | "
            f"{row['per_moment']:.4f} | {row['table_per_param']:.4f} |"
        )
    lines += [
        "",
        "Targets: int8 <= 1.05 bytes per parameter per moment (float32: 4), bfloat16 2, "
        "row-wise <= 4/D = 0.0625 for D = 64, factored <= 4(n+m)/(nm) = "
        f"{4 * (50_000 + 64) / (50_000 * 64):.4f} for the table.",
        "",
        "## Step time",
        "",
        f"One jitted `update_and_apply` with donated parameters and state on the pytree "
        f"above; median of {args.rounds} alternating single calls, relative to the same "
        "optimizer with float32 state.",
        "",
        "| option | median step ms | relative to float32 state | compile + first step s |",
        "|---|---:|---:|---:|",
    ]
    base = {name: family for name, family, _, _ in options()}
    own_baseline = [name for name in base if name.endswith("]")]
    opts_names = list(quality)
    for name, (median, compile_s) in speed.items():
        relative = median / speed[base[name]][0]
        lines.append(f"| {name} | {median * 1e3:.2f} | {relative:.2f}x | {compile_s:.2f} |")
    lines += peak_section(peak, args.rounds)
    lines += [
        "",
        "## Training quality: digits MLP",
        "",
        f"scikit-learn's digits (1,437 training, 360 test images), MLP 64 -> 256 -> 256 -> "
        f"10, minibatches of 64, {args.steps} steps, the same batches for every option; "
        f"mean (min-max) over {args.seeds} seeds. Learning rates (cosine decay to zero over "
        "the run): RMSprop 1e-3, RMSprop with momentum 0.9 3e-4, Adagrad and row-wise "
        "Adagrad 3e-2, factored RMSprop 1e-3. The loss is the cross-entropy over the whole "
        'training set, after the last step and halfway. "vs float32" compares the mean '
        "loss with the same optimizer's float32 state (row-wise and factored rules are "
        "other optimizers: compare them with the table's Adagrad and RMSprop rows); \"seed "
        "by seed\" is the mean over the seeds of the log of each seed's final loss over "
        "float32 state's with the same seed (the same batches and initial parameters), "
        "with its standard error: the seeds' own spread cancels there.",
        "",
        "| option | final training loss | vs float32 | seed by seed (s.e.) | loss halfway "
        "| vs float32 | test accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    half = (quality[opts_names[0]][0].shape[1] - 1) // 2

    def seed_by_seed(name, curves) -> str:
        if name not in own_baseline:
            return "other rule"
        ratios = np.log(curves[:, -1] / quality[base[name]][0][:, -1])
        if len(ratios) < 2:
            return f"{ratios.mean():+.1%}"
        return f"{ratios.mean():+.1%} ({ratios.std(ddof=1) / np.sqrt(len(ratios)):.1%})"

    for name, (curves, accuracies) in quality.items():
        cells = []
        for column in (-1, half):
            values = curves[:, column]
            if name in own_baseline:
                change = values.mean() / quality[base[name]][0][:, column].mean() - 1
                change_text = f"{change:+.1%}"
            else:
                change_text = "other rule"
            cells.append(
                f"{values.mean():.5f} ({values.min():.5f}-{values.max():.5f}) | {change_text}"
            )
        lines.append(
            f"| {name} | {cells[0]} | {seed_by_seed(name, curves)} | {cells[1]} | "
            f"{accuracies.mean():.4f} |"
        )
    if plotted:
        lines += ["", f"![training loss curves]({png_name})"]
    lines += [
        "",
        "## Reading these numbers",
        "",
        "- Bytes are exact (`nbytes` of the state). int8 costs 1 + 4/256 bytes per element "
        "of a quantized array; the small arrays that keep float32 bring the whole tree to "
        "slightly more.",
        "- Step times come from a shared CPU whose timings drift by 15-20% between "
        "identical runs; compare rows of one run only. On a CPU the int8 work (decoding "
        "and encoding each element, the block scales, the rounding hash) is arithmetic "
        "the float32 step does not do, so int8 state costs step time there; it has not "
        "been measured on an accelerator, where a step of this size is bound by memory "
        "traffic.",
        "- Read a difference between storage options against the spread between seeds "
        "(the min-max columns) and the seed-by-seed column, whose seeds share batches and "
        "initial parameters. docs/memory.md has what rounding second moments to nearest, "
        "instead of without bias, costs on this benchmark.",
    ]
    results_file.write_section("memory", "\n".join(lines), path)
