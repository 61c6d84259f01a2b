"""The markdown tables of the speed benchmark (``run.py``): step and compile time per
contender, the issue's targets against the best this machine allows, and the bytes XLA
CPU's kernels move."""

from __future__ import annotations

import jax
from speed_contenders import ALGORITHMS, FLOAT32_BYTES, FLOOR, STACKED
from speed_measure import Row


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def table(rows: list[Row], names: list[str]) -> list[str]:
    jax_names = [n for n in names if not n.startswith("torch")]
    header = ["algorithm", "leaves x size"]
    header += [f"step ms {n}" for n in names]
    header += [f"{n} / optax" for n in jax_names if n != "optax"]
    header += [f"compile s {n}" for n in jax_names]
    header += [f"{n} compile / optax" for n in jax_names if n != "optax"]
    header += [f"bandwidth {n}" for n in jax_names if n != FLOOR]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        base_step = row.step_ms.get("optax", 0.0)
        base_compile = row.compile_s.get("optax", 0.0)
        cells = [ALGORITHMS[row.algorithm]["label"], row.shape]
        cells += [f"{row.step_ms[n]:.2f}" if n in row.step_ms else "-" for n in names]
        cells += [
            fmt_ratio(row.step_ms[n], base_step) if n in row.step_ms else "-"
            for n in jax_names
            if n != "optax"
        ]
        cells += [f"{row.compile_s[n]:.2f}" if n in row.compile_s else "-" for n in jax_names]
        cells += [
            fmt_ratio(row.compile_s[n], base_compile) if n in row.compile_s else "-"
            for n in jax_names
            if n != "optax"
        ]
        cells += [
            f"{row.bandwidth[n]:.0%}" if n in row.bandwidth else "-"
            for n in jax_names
            if n != FLOOR
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def step_bound_ms(row: Row) -> float | None:
    """The fastest step this machine allows with per-leaf parameters and gradients: the
    measured floor (``p - lr * g``, 12 bytes per parameter, no state) plus the time the
    algorithm's extra bytes take at the streaming bandwidth. None without a floor."""
    if FLOOR not in row.step_ms:
        return None
    algorithm = ALGORITHMS[row.algorithm]
    extra = (algorithm["reads"] + algorithm["writes"] - 3) * FLOAT32_BYTES * row.count * row.size
    return row.step_ms[FLOOR] + extra / (row.stream_gbs * 1e9) * 1e3


def targets(rows: list[Row], contender: str) -> list[str]:
    """The issue's targets, checked on ``contender`` against optax in the same run, with
    the best this machine allows (see :func:`step_bound_ms` and :func:`kernel_traffic`)."""
    lines = []
    for row in rows:
        if contender not in row.step_ms or "optax" not in row.step_ms:
            continue
        step = row.step_ms[contender] / row.step_ms["optax"]
        compile_ratio = row.compile_s[contender] / row.compile_s["optax"]
        label = f"{ALGORITHMS[row.algorithm]['label']}, {row.shape}"
        if row.count == 1:
            bandwidth = row.bandwidth[contender]
            ok = step <= 1.0 and bandwidth >= 0.8
            bound, out_of_reach = "-", False
            if jax.default_backend() == "cpu":
                algorithm = ALGORITHMS[row.algorithm]
                best = (algorithm["reads"] + algorithm["writes"]) / algorithm["kernel_arrays"]
                bound, out_of_reach = f"{best:.0%} of streaming", best < 0.8
            target = "step <= 1.0x optax and >= 80% of streaming"
            measured = f"{step:.2f}x, {bandwidth:.0%}"
        elif row.count >= 1000:
            ok = step <= 0.6 and compile_ratio <= 0.5
            bound, out_of_reach = "-", False
            best_ms = step_bound_ms(row)
            if best_ms is not None:
                best_step = best_ms / row.step_ms["optax"]
                best_compile = row.compile_s[FLOOR] / row.compile_s["optax"]
                bound = f"{best_step:.2f}x, {best_compile:.2f}x"
                out_of_reach = best_step > 0.6 or best_compile > 0.5
            target = "step <= 0.6x and compile <= 0.5x optax"
            measured = f"{step:.2f}x, {compile_ratio:.2f}x"
        else:
            continue
        verdict = "met" if ok else "NOT met"
        if not ok and out_of_reach:
            verdict += ", beyond the estimated best"
        lines.append(f"| {label} | {target} | {measured} | {bound} | {verdict} |")
    if not lines:
        return []
    return [
        f"| case ({contender}) | target | measured | best possible here (estimate) | |",
        "|---|---|---|---|---|",
        *lines,
    ]


def layout_cost(rows: list[Row]) -> list[str]:
    """For rows of many leaves: ``rmsjax.grouped`` beside ``stacked``, the same blocks
    with optax's arithmetic and nothing else, as ratios to optax."""
    lines = []
    for row in rows:
        names = ("rmsjax.grouped", STACKED, FLOOR, "optax")
        if row.count < 1000 or any(n not in row.compile_s for n in names):
            continue
        cells = [
            f"{name} {fmt_ratio(row.compile_s[name], row.compile_s['optax'])} "
            f"({fmt_ratio(row.step_ms[name], row.step_ms['optax'])} step)"
            for name in names[:3]
        ]
        lines.append(f"- {ALGORITHMS[row.algorithm]['label']}, {row.shape}: {', '.join(cells)}.")
    if not lines:
        return []
    return [
        "Compile time against optax's on many leaves: `rmsjax.grouped`; `stacked`, the same "
        "blocks with optax's arithmetic and nothing else (none of rmsjax's range handling, "
        "checks or ordering of the blocks), which is what the layout itself costs; and the "
        "`floor` (step-time ratios in brackets):",
        "",
        *lines,
        "",
    ]


def kernel_traffic(rows: list[Row]) -> list[str]:
    """For one-leaf rows: the bytes XLA CPU's kernels move, over the step time."""
    lines = []
    for row in rows:
        if row.count != 1:
            continue
        arrays = ALGORITHMS[row.algorithm]["kernel_arrays"]
        cells = []
        for name in ("optax", "rmsjax", "rmsjax.grouped"):
            if name in row.step_ms:
                gbs = arrays * FLOAT32_BYTES * row.size / (row.step_ms[name] / 1e3) / 1e9
                cells.append(f"{name} {gbs / row.stream_gbs:.0%}")
        lines.append(
            f"- {ALGORITHMS[row.algorithm]['label']}, {row.shape}: the compiled step moves "
            f"{arrays * FLOAT32_BYTES} bytes per parameter; counted that way: {', '.join(cells)}."
        )
    if not lines:
        return []
    return [
        "On one leaf the bandwidth column counts the bytes the step *must* move. XLA CPU "
        "writes each output (parameter, second moment, momentum) with its own kernel, so the "
        "compiled step reads the gradient and the new moment twice; counting the bytes its "
        "kernels really move gives the fraction of the streaming kernel they reach:",
        "",
        *lines,
        "",
    ]
