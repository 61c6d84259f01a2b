"""Optimizer step and compile time: rmsjax against optax (and torch.optim when installed).

    python benchmarks/run.py             # the full run, writes benchmarks/RESULTS.md and .png
    python benchmarks/run.py --quick     # a smoke run on small trees, writes nothing

For each pytree shape (leaf count x leaf size, float32) and each algorithm (rmsprop,
rmsprop with momentum, adagrad) it builds one jitted step per contender, with the
parameters and the optimizer state donated, and measures:

* step time: the contenders are called in turn, one call each per round in a rotating
  order, and the median of many single calls is kept, so that the load of other
  processes on the machine falls on all of them alike;
* compile time: tracing, lowering and compiling a fresh function, from a cleared cache;
* bandwidth: the bytes the step must move (parameters, gradients and state read, and
  parameters and state written) over its median time, as a fraction of a streaming
  kernel (a donated ``a * s + b`` over as many elements as the largest tree) timed in
  turn with the contenders of the same row.

Contenders: ``optax`` (``tx.update`` then ``optax.apply_updates``); ``rmsjax``
(the fused chain with ``rmsjax.update_and_apply``, per-leaf state);
``rmsjax.grouped`` (the same inside ``rmsjax.grouped``: the state in blocks of
same-shaped leaves); ``floor`` (``p - lr * g`` on every leaf and no state: the
cheapest step a jitted function with per-leaf parameters and gradients can take, so
``floor / optax`` bounds every ratio an optimizer can reach on this machine);
``torch-foreach`` and ``torch-fused`` (``torch.optim`` on CPU tensors) when torch is
importable.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import results_file

import rmsjax as rj

HERE = os.path.dirname(os.path.abspath(__file__))
FLOAT32_BYTES = 4

# Arrays each step must read and write per parameter, for the bandwidth figure, and the
# arrays XLA CPU's kernels actually read and write (one kernel per output, no multi-output
# fusion: see docs/performance.md), read off the compiled HLO of a one-leaf step.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "rmsprop": {"reads": 3, "writes": 2, "kernel_arrays": 7, "label": "rmsprop"},
    "rmsprop_momentum": {
        "reads": 4,
        "writes": 3,
        "kernel_arrays": 10,
        "label": "rmsprop + momentum",
    },
    "adagrad": {"reads": 3, "writes": 2, "kernel_arrays": 7, "label": "adagrad"},
}
FLOOR = "floor"  # the stateless `p - lr * g` step: no optimizer can do with less
TORCH_EVERY = 4  # torch is called in one round of this many: it is slow and only a reference
LEARNING_RATE = 1e-3


def rmsjax_optimizer(algorithm: str) -> rj.GradientTransformation:
    if algorithm == "rmsprop":
        return rj.rmsprop(LEARNING_RATE)
    if algorithm == "rmsprop_momentum":
        return rj.rmsprop(LEARNING_RATE, momentum=0.9)
    return rj.adagrad(LEARNING_RATE)


def optax_optimizer(algorithm: str):
    import optax

    if algorithm == "rmsprop":
        return optax.rmsprop(LEARNING_RATE)
    if algorithm == "rmsprop_momentum":
        return optax.rmsprop(LEARNING_RATE, momentum=0.9)
    return optax.adagrad(LEARNING_RATE)


# ---------------------------------------------------------------------------- pytrees


def parse_size(text: str) -> tuple[int, int]:
    """``"1000x16k"`` -> (1000, 16384); k and M are powers of two (1k = 1024)."""
    count, _, size = text.lower().partition("x")
    scale = 1
    if size.endswith("k"):
        scale, size = 1 << 10, size[:-1]
    elif size.endswith("m"):
        scale, size = 1 << 20, size[:-1]
    return int(count), int(size) * scale


def make_tree(count: int, size: int, seed: int, scale: float) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    width = len(str(count - 1))
    return {
        f"layer{i:0{width}d}": jnp.asarray(rng.standard_normal(size, np.float32) * scale)
        for i in range(count)
    }


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


# ------------------------------------------------------------------------ contenders


@dataclass
class Contender:
    """One way to run the step: ``make()`` returns a fresh (not yet jitted) step
    function ``(params, state, grads) -> (params, state)`` and an init function."""

    name: str
    make: Callable[[], tuple[Callable, Callable]]


def jax_contenders(algorithm: str, block_size: int | None = None) -> list[Contender]:
    def optax_make():
        import optax

        tx = optax_optimizer(algorithm)

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step, tx.init

    def rmsjax_make(grouped: bool):
        def make():
            tx = rmsjax_optimizer(algorithm)
            if grouped:
                tx = rj.grouped(tx) if block_size is None else rj.grouped(tx, block_size=block_size)

            def step(params, state, grads):
                return rj.update_and_apply(tx, grads, state, params)

            return step, tx.init

        return make

    def floor_make():
        # The cheapest step with the same interface: parameters and gradients in,
        # parameters out, one kernel per leaf and no optimizer state at all.
        def step(params, state, grads):
            return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), state

        return step, lambda params: ()

    return [
        Contender("optax", optax_make),
        Contender("rmsjax", rmsjax_make(False)),
        Contender("rmsjax.grouped", rmsjax_make(True)),
        Contender(FLOOR, floor_make),
    ]


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class TorchRunner:
    """torch.optim on CPU tensors, ``foreach`` or ``fused``, with the same numbers'
    shapes; gradients are set once and ``optimizer.step()`` is timed."""

    def __init__(self, algorithm: str, params: dict, grads: dict, mode: str):
        import torch

        self.torch = torch
        self.params = [torch.tensor(np.asarray(p)) for p in params.values()]
        for p, g in zip(self.params, grads.values()):
            p.grad = torch.tensor(np.asarray(g))
        options = {"foreach": True} if mode == "foreach" else {"fused": True}
        if algorithm == "adagrad":
            self.optimizer = torch.optim.Adagrad(self.params, lr=LEARNING_RATE, **options)
        else:
            momentum = 0.9 if algorithm == "rmsprop_momentum" else 0.0
            self.optimizer = torch.optim.RMSprop(
                self.params, lr=LEARNING_RATE, alpha=0.9, momentum=momentum, **options
            )
        self.optimizer.step()  # builds the state

    def step(self) -> None:
        with self.torch.no_grad():
            self.optimizer.step()


# ------------------------------------------------------------------------- measuring


def block(tree: Any) -> None:
    for leaf in jax.tree.leaves(tree):
        leaf.block_until_ready()


STREAM = "stream"  # the streaming kernel, timed in every row among the contenders


def streaming_runner(elements: int) -> Callable[[], None]:
    """One call of a donated ``a * s + b`` over ``elements`` float32s (12 bytes each)."""

    def triad(a, b):
        return a * jnp.float32(0.999) + b

    f = jax.jit(triad, donate_argnums=0)
    carry = {"a": jnp.ones(elements, jnp.float32)}
    b = jnp.full(elements, 1e-3, jnp.float32)

    def run():
        carry["a"] = f(carry["a"], b)
        carry["a"].block_until_ready()

    run()
    return run


def compile_seconds(contender: Contender, params, grads) -> float:
    """Trace, lower and compile a fresh step from a cleared cache."""
    jax.clear_caches()
    gc.collect()
    step, init = contender.make()
    state = jax.eval_shape(init, params)
    start = time.perf_counter()
    jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    return time.perf_counter() - start


@dataclass
class Row:
    algorithm: str
    shape: str
    count: int
    size: int
    step_ms: dict[str, float] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    bandwidth: dict[str, float] = field(default_factory=dict)  # fraction of streaming
    stream_gbs: float = 0.0  # the streaming kernel, measured among this row's contenders


def measure(
    algorithm: str,
    shape: str,
    rounds: int,
    compile_repeats: int,
    stream_elements: int,
    with_torch: bool,
    names: list[str] | None,
    block_size: int | None = None,
) -> Row:
    count, size = parse_size(shape)
    row = Row(algorithm, shape, count, size)
    params0 = make_tree(count, size, seed=0, scale=1.0)
    grads = make_tree(count, size, seed=1, scale=1e-2)
    contenders = [
        c for c in jax_contenders(algorithm, block_size) if names is None or c.name in names
    ]

    # Compile times, alternating the contenders.
    compile_times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for _ in range(compile_repeats):
        for contender in contenders:
            compile_times[contender.name].append(compile_seconds(contender, params0, grads))
    for name, values in compile_times.items():
        row.compile_s[name] = statistics.median(values)

    # Steps: one compiled step per contender, called in turn.
    runners: dict[str, Callable[[], None]] = {}
    for contender in contenders:
        step, init = contender.make()
        jitted = jax.jit(step, donate_argnums=(0, 1))
        params = copy_tree(params0)
        carry = {"params": params, "state": init(params)}

        def run(jitted=jitted, carry=carry):
            carry["params"], carry["state"] = jitted(carry["params"], carry["state"], grads)
            block(carry["params"])

        run()  # compile and warm up
        run()
        runners[contender.name] = run
    if with_torch:
        for mode in ("foreach", "fused"):
            try:
                runner = TorchRunner(algorithm, params0, grads, mode)
            except (RuntimeError, TypeError, ValueError) as error:
                print(f"  torch-{mode} unavailable for {algorithm}: {error}", file=sys.stderr)
                continue
            runner.step()
            runners[f"torch-{mode}"] = runner.step

    # The streaming kernel takes its turn with the contenders, so that the bandwidth
    # fractions compare timings taken under the same load.
    runners[STREAM] = streaming_runner(stream_elements)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            if name.startswith("torch") and r % TORCH_EVERY:
                continue
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    moved = (ALGORITHMS[algorithm]["reads"] + ALGORITHMS[algorithm]["writes"]) * FLOAT32_BYTES
    stream_gbs = 3 * FLOAT32_BYTES * stream_elements / statistics.median(times.pop(STREAM)) / 1e9
    row.stream_gbs = stream_gbs
    for name, values in times.items():
        seconds = statistics.median(values)
        row.step_ms[name] = seconds * 1e3
        if name != FLOOR:
            row.bandwidth[name] = moved * count * size / seconds / 1e9 / stream_gbs
    del runners
    gc.collect()
    return row


# --------------------------------------------------------------------------- reports


def machine_lines(rows: list[Row], stream_elements: int) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            kib = int(handle.readline().split()[1])
            memory = f", {kib / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for package in ("jax", "jaxlib", "optax", "numpy", "torch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    speeds = [row.stream_gbs for row in rows]
    return [
        f"- Machine: {cpu}, {os.cpu_count()} CPU cores{memory}; "
        f"JAX backend `{jax.default_backend()}` ({devices}).",
        f"- Python {platform.python_version()}; {', '.join(versions)}; rmsjax {rj.__version__}.",
        f"- Streaming bandwidth (donated `a * s + b`, {stream_elements / 2**20:.0f}M float32, "
        "12 bytes per element, timed in every row in turn with the contenders): median "
        f"**{statistics.median(speeds):.1f} GB/s** over the rows, from {min(speeds):.1f} to "
        f"{max(speeds):.1f}; each row's bandwidth fractions use that row's own figure.",
    ]


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
        f"- Steps: median of {rounds} single calls per contender, the contenders called in "
        "turn in a rotating order; parameters and state donated; the gradients fixed. "
        f"Compile: median of {compile_repeats} (trace + lower + XLA compile of a fresh "
        "function after `jax.clear_caches()`).",
        "- Bandwidth: bytes the step must move (float32 parameters, gradients and state "
        "read; parameters and state written: 20 bytes per parameter for rmsprop and "
        "adagrad, 28 with momentum) over the median step time, as a fraction of the "
        "row's streaming bandwidth.",
        "- The machine is shared: other processes ran during the measurement, so absolute "
        "times move by 15-20% or more between runs; compare the ratios, which come from "
        "one process with the contenders alternated.",
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
    lines += [
        "- GPU: not measured (no GPU was available for this run); the same command "
        "measures the GPU when JAX's default backend is one.",
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
        "## Targets (issue 4), on this run",
        "",
        *targets(rows, "rmsjax.grouped"),
        "",
        *targets(rows, "rmsjax"),
        "",
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
        "give optax's numbers bit for bit (tests/test_fusion.py). `floor` is no optimizer: "
        "it steps every leaf by `p - lr * g` and keeps no state, in the same jitted, donated "
        "call, so no optimizer taking and returning these per-leaf pytrees can be faster "
        "here. docs/performance.md explains where the time goes.",
        "",
    ]
    if os.path.abspath(path) == str(results_file.RESULTS):
        results_file.write_section("speed", "\n".join(lines))
    else:
        with open(path, "w") as handle:
            handle.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small trees, few rounds")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated leaves x size, e.g. 1x16M,3000x1k (default: the four issue trees)",
    )
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help="comma-separated algorithms"
    )
    parser.add_argument("--contenders", default=None, help="comma-separated contender names")
    parser.add_argument("--rounds", type=int, default=None, help="step calls per contender")
    parser.add_argument("--compile-repeats", type=int, default=None)
    parser.add_argument("--no-torch", action="store_true", help="leave torch.optim out")
    parser.add_argument(
        "--block-size", type=int, default=None, help="rmsjax.grouped block size (default: its own)"
    )
    parser.add_argument(
        "--output",
        default=None,
        help="where to write the markdown report (default: benchmarks/RESULTS.md for a "
        "full run, nothing with --quick or --sizes)",
    )
    args = parser.parse_args(argv)

    started = datetime.datetime.now(datetime.UTC)
    clock = time.perf_counter()
    if args.sizes:
        sizes = args.sizes.split(",")
    elif args.quick:
        sizes = ["1x64k", "100x1k", "300x256"]
    else:
        sizes = ["1x16M", "100x160k", "1000x16k", "3000x1k"]
    rounds = args.rounds or (10 if args.quick else 40)
    compile_repeats = args.compile_repeats or (1 if args.quick else 3)
    algorithms = args.algorithms.split(",")
    for algorithm in algorithms:
        if algorithm not in ALGORITHMS:
            parser.error(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    names = args.contenders.split(",") if args.contenders else None
    with_torch = (
        torch_available()
        and not args.no_torch
        and (names is None or any(n.startswith("torch") for n in names))
    )
    output = args.output
    if output is None and not args.quick and not args.sizes:
        output = os.path.join(HERE, "RESULTS.md")

    stream_elements = max(parse_size(s)[0] * parse_size(s)[1] for s in sizes)

    rows = []
    for shape in sizes:
        for algorithm in algorithms:
            row = measure(
                algorithm, shape, rounds, compile_repeats, stream_elements, with_torch, names
            )
            rows.append(row)
            cells = ", ".join(
                f"{n} {row.step_ms[n]:.2f} ms"
                + (f" / {row.compile_s[n]:.1f} s" if n in row.compile_s else "")
                for n in row.step_ms
            )
            print(f"{algorithm:17s} {shape:9s} {cells}", flush=True)

    all_names = []
    for row in rows:
        all_names += [n for n in row.step_ms if n not in all_names]
    print("\n".join(table(rows, all_names)))
    if output:
        plot_name = os.path.splitext(os.path.basename(output))[0] + ".png"
        plot(rows, all_names, os.path.join(os.path.dirname(output) or ".", plot_name))
        write_results(
            output,
            rows,
            all_names,
            stream_elements,
            "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            rounds,
            compile_repeats,
            with_torch,
            started,
            time.perf_counter() - clock,
            plot_name,
        )
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
