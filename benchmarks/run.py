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
same-shaped leaves); ``stacked`` (the same blocks with optax's arithmetic and nothing
else of rmsjax: what the grouped layout itself costs); ``floor`` (``p - lr * g`` on
every leaf and no state: the cheapest step a jitted function with per-leaf parameters
and gradients can take, so ``floor / optax`` bounds, to within the timing noise, every
ratio an optimizer can reach on this machine);
``torch-foreach`` and ``torch-fused`` (``torch.optim`` on CPU tensors) when torch is
importable.

The parts: ``speed_contenders.py`` (the algorithms and the contenders),
``speed_measure.py`` (one row: compile and step times, bandwidth), ``alternating.py``
(the timing harness shared with ``memory.py``), ``speed_tables.py`` (the markdown
tables) and ``speed_report.py`` (the machine, the plot, the RESULTS.md section).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

from speed_contenders import ALGORITHMS, torch_available
from speed_measure import measure, parse_size
from speed_report import plot, write_results
from speed_tables import table

HERE = os.path.dirname(os.path.abspath(__file__))


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
            " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
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
