"""Optimizer-state memory, step time and training quality for every storage option.

Three measurements, printed as tables and written to the memory section of
``benchmarks/RESULTS.md``:

1. **State bytes per parameter** on a realistic pytree: a 50,000 x 64 embedding table
   and an MLP (64 -> 512 -> 512 -> 10, with biases), for RMSprop and Adagrad with
   float32, bfloat16 and int8 state, row-wise Adagrad and factored RMSprop; per moment
   too (RMSprop with momentum keeps two moments per parameter).
2. **Step time** of one jitted, buffer-donating ``update_and_apply`` on that pytree,
   relative to the same optimizer with float32 state (medians of alternating single
   calls, as timings on shared machines drift); and at scale, on one leaf of 4M
   parameters and on 1000 leaves of 16k, the step's **peak memory** in XLA's own
   accounting of the compiled step (arguments and temporaries) beside its time, and
   the compile's time and peak memory (each optimizer in a process of its own).
3. **Training quality**: an MLP classifier (64 -> 256 -> 256 -> 10) on scikit-learn's
   handwritten digits, the same minibatches and steps for every option, several seeds:
   final training loss (over the whole training set) and test accuracy, and a PNG of
   the loss curves (``benchmarks/memory_curves.png``, needs matplotlib).

Usage::

    python benchmarks/memory.py [--quick] [--steps N] [--seeds K] [--out benchmarks]

Needs scikit-learn for the digits (``pip install scikit-learn``).

The parts: ``memory_options.py`` (the storage options), ``memory_cost.py`` (state bytes
and step time, timed with ``alternating.py``), ``memory_peak.py`` (peak step memory and
step time at scale), ``memory_quality.py`` (the digits runs) and ``memory_report.py``
(the plot and the RESULTS.md section).
"""

from __future__ import annotations

import argparse
import pathlib

import jax
from memory_cost import measure_memory, measure_speed, realistic_params
from memory_options import options
from memory_peak import measure_peak
from memory_quality import measure_quality
from memory_report import plot, write_report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="folder of RESULTS.md and the PNG (default: benchmarks/, or out/benchmarks/ "
        "with --quick, so a smoke run never overwrites the recorded figures)",
    )
    args = parser.parse_args()
    here = pathlib.Path(__file__).resolve().parent
    if args.out is None:
        args.out = here.parent / "out" / "benchmarks" if args.quick else here
    if args.quick:
        args.steps, args.seeds, args.rounds = 100, 2, 5
    every = 25
    args.steps -= args.steps % every
    args.out.mkdir(parents=True, exist_ok=True)
    opts = options(args.steps)

    params = realistic_params(jax.random.key(0))
    count, memory = measure_memory(opts, params)
    print(f"state bytes per parameter ({count:,} parameters):")
    for row in memory:
        print(
            f"  {row['name']:<28} {row['per_param']:.4f}  per moment {row['per_moment']:.4f}"
            f"  table {row['table_per_param']:.4f}"
        )
    print("step time (median ms):")
    speed = measure_speed(opts, params, args.rounds)
    for name, (median, _) in speed.items():
        print(f"  {name:<28} {median * 1e3:.2f}")
    print("peak step memory and step time at scale:")
    peak = measure_peak(args.rounds, quick=args.quick)
    print(f"training quality ({args.steps} steps, {args.seeds} seeds):")
    quality = measure_quality(opts, args.steps, args.seeds, every=every)
    png = "memory_curves.png"
    plotted = plot(quality, args.steps, every, args.out / png)
    write_report(args.out / "RESULTS.md", args, count, memory, speed, peak, quality, plotted, png)
    print(f"wrote the memory section of {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
