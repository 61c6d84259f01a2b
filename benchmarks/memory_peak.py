"""Peak memory and step time of a training step at scale, per storage option.

Peak memory is XLA's own accounting of the compiled step (``jit(...).lower(...).compile()
.memory_analysis()``), parameters and state donated: the arguments (parameters, gradients
and state), plus the temporaries the step allocates, plus any output that could not be
written over its donated input. Step time is the median of single calls, the three
storage options of one optimizer called in turn (see ``alternating.py``), as a ratio to
the float32-state step; compile time is the first ``lower + compile``.

Timed with them, "codes alone" re-encodes the int8 state and nothing else: every
quantized slot decoded and encoded again (``quantize(dequantize(q))``), jitted and
donated, with no optimizer arithmetic. An int8 step must do that much beyond a float32
one, so its ratio to the float32-state step is a floor, on this machine, for the int8
step's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from alternating import median_seconds, step_runner

import rmsjax as rj

SHAPES = {
    "1 x 4M": (1, (4096, 1024)),
    "100 x 16k": (100, (64, 256)),
    "1000 x 16k": (1000, (64, 256)),
}
"""Trees measured: a label and (leaves, shape of each leaf). On 100 leaves the per-leaf
int8 slots are not encoded in turn (``in_turn.MAX_LEAVES``) and their compile still fits
in a few GB; on 1000 it may not fit in 24 GiB."""
QUICK_SHAPES = {"1 x 256k": (1, (256, 1024)), "20 x 16k": (20, (64, 256))}

ALGORITHMS = {
    "rmsprop": lambda storage: rj.rmsprop(1e-3, storage=storage),
    "rmsprop+momentum": lambda storage: rj.rmsprop(1e-3, momentum=0.9, storage=storage),
    "adagrad": lambda storage: rj.adagrad(1e-2, storage=storage),
}
STORAGES = ("float32", "bfloat16", "int8")
GROUPED = "int8, grouped"
"""On trees of many leaves, also int8 state under ``rj.grouped`` (blocks of up to 16-32
stacked leaves): each block's step is compiled once instead of once per leaf, which
takes a fraction of the compile time and memory of per-leaf int8 state there
(docs/performance.md, "Compile time")."""


def contenders(label: str, quick: bool) -> tuple[str, ...]:
    """The storage options measured on a tree, in the order they are compiled: float32
    first (the reference of the ratios), per-leaf int8 last. Most of what a compile takes
    stays held by its executable, and the memory freed by a large compile is reused by
    the next ones, so a compile after the per-leaf int8 one would seem to take nothing."""
    leaves, _ = (QUICK_SHAPES if quick else SHAPES)[label]
    return ("float32", "bfloat16") + ((GROUPED,) if leaves > 1 else ()) + ("int8",)


def make_tx(algorithm: str, storage: str) -> rj.GradientTransformation:
    if storage == GROUPED:  # every leaf of these trees is stacked
        return rj.grouped(ALGORITHMS[algorithm]("int8"), max_stacked_size=1 << 30)
    return ALGORITHMS[algorithm](storage)


def tree(leaves: int, shape: tuple[int, int], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"w{i:04d}": jnp.asarray(rng.normal(size=shape).astype(np.float32)) for i in range(leaves)
    }


def peak_bytes(compiled) -> tuple[int, int, int]:
    """(argument bytes, temporary bytes, peak bytes) of a compiled step; outputs written
    over donated arguments (aliased) cost nothing more."""
    stats = compiled.memory_analysis()
    extra_outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    arguments, temporaries = stats.argument_size_in_bytes, stats.temp_size_in_bytes
    return arguments, temporaries, arguments + temporaries + extra_outputs


def reset_peak_memory() -> None:
    """Resets this process's peak resident memory (Linux: ``/proc/self/clear_refs``;
    elsewhere nothing, and :func:`resident_gb` reports NaN)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def resident_gb(field: str = "VmHWM") -> float:
    """This process's peak resident memory since the last reset (Linux's ``VmHWM``), or
    with ``field="VmRSS"`` its resident memory now, in GB; NaN where ``/proc`` does not
    report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def measure_peak(rounds: int, quick: bool = False) -> list[dict]:
    """One row per (tree, optimizer, storage option); on trees of many leaves also int8
    state under ``grouped`` (:data:`GROUPED`). Each (tree, optimizer) group runs in
    a process of its own: compiling an int8 step of 1000 leaves takes 20 GB and more at
    its peak (docs/memory.md), which a process shared with the earlier groups may not
    have left on a 24 GiB machine."""
    rows = []
    for label in QUICK_SHAPES if quick else SHAPES:
        for algorithm in ALGORITHMS:
            rows += _group_rows(label, algorithm, rounds, quick)
    return rows


def _group_rows(label: str, algorithm: str, rounds: int, quick: bool) -> list[dict]:
    """One group's rows from a process of its own. When that process is killed (out of
    memory: the int8 compile is the largest), the group is measured again without int8,
    whose row then says why it is missing."""
    storages, missing = contenders(label, quick), []
    while True:
        command = [sys.executable, __file__, label, algorithm, str(rounds), *storages]
        if quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode >= 0:
            break
        reason = f"killed by signal {-done.returncode} (out of memory?)"
        print(f"  {label:<11} {algorithm:<17} {'/'.join(storages)}: {reason}", flush=True)
        dropped = ("int8",) if "int8" in storages else storages
        missing += [
            {"tree": label, "algorithm": algorithm, "storage": s, "failed": reason} for s in dropped
        ]
        storages = tuple(s for s in storages if s not in dropped)
        if not storages:
            return missing
    if done.returncode:
        raise RuntimeError(f"{label} {algorithm}: {done.stderr[-2000:]}")
    *printed, found = done.stdout.rstrip("\n").split("\n")
    print("\n".join(printed), flush=True)
    order = (*STORAGES, GROUPED)  # as the table shows them
    return sorted(json.loads(found) + missing, key=lambda row: order.index(row["storage"]))


def measure_group(
    label: str, algorithm: str, rounds: int, quick: bool, storages: tuple = STORAGES
) -> list[dict]:
    """The rows of one tree and one optimizer, its storage options called in turn
    (``storages``: float32 first, the reference of the ratios)."""
    leaves, shape = (QUICK_SHAPES if quick else SHAPES)[label]
    params = tree(leaves, shape)
    grads = jax.tree.map(lambda p: p * 1e-2, tree(leaves, shape, seed=1))
    count = leaves * shape[0] * shape[1]
    runners, found = {}, {}
    for storage in storages:
        tx = make_tx(algorithm, storage)
        step = jax.jit(
            lambda p, s, g, tx=tx: rj.update_and_apply(tx, g, s, p),
            donate_argnums=(0, 1),
        )
        p = jax.tree.map(jnp.copy, params)
        state = tx.init(p)
        reset_peak_memory()
        before_gb = resident_gb("VmRSS")  # the earlier contenders' executables included
        start = time.perf_counter()
        compiled = step.lower(p, state, grads).compile()
        compile_s = time.perf_counter() - start
        compile_gb = resident_gb() - before_gb
        arguments, temporaries, peak = peak_bytes(compiled)
        if storage == "int8":  # a copy for the codes-alone runner (the step donates its own)
            found_state = jax.tree.map(jnp.copy, state)
        run = step_runner(compiled, p, state, grads)
        run()
        runners[storage] = run
        found[storage] = {
            "tree": label,
            "algorithm": algorithm,
            "storage": storage,
            "arguments": arguments / count,
            "temporaries": temporaries / count,
            "peak": peak / count,
            "compile_s": compile_s,
            "compile_gb": compile_gb,
        }
        if storage == "int8":
            found[storage]["state"] = found_state
        print(
            f"  {label:<11} {algorithm:<17} {storage:<13} peak {peak / count:5.2f} B/param"
            f" (temporaries {temporaries / count:5.2f}), compile {compile_s:6.1f} s,"
            f" {compile_gb:.1f} GB",
            flush=True,
        )
    if "int8" in found:
        runners[CODES_ALONE] = codes_runner(found["int8"].pop("state"))
    medians = median_seconds(runners, rounds)
    for storage in storages:
        found[storage]["step_ms"] = medians[storage] * 1e3
        found[storage]["relative"] = medians[storage] / medians["float32"]
    if "int8" in found:
        found["int8"]["codes_alone"] = medians[CODES_ALONE] / medians["float32"]
    return [found[storage] for storage in storages]


CODES_ALONE = "codes alone"


def codes_runner(state) -> Callable[[], None]:
    """One call of a jitted, donated re-encoding of every quantized slot of ``state``:
    the decoding and encoding an int8 step does, and nothing else (see the notes above)."""
    quantized = lambda x: isinstance(x, rj.QuantizedArray)  # noqa: E731

    def recode(state):
        return jax.tree.map(
            lambda q: rj.quantize(rj.dequantize(q), signed=q.signed) if quantized(q) else q,
            state,
            is_leaf=quantized,
        )

    step = jax.jit(recode, donate_argnums=0)
    carry = [jax.tree.map(jnp.copy, state)]

    def run() -> None:
        carry[0] = jax.block_until_ready(step(carry[0]))

    run()  # compile
    return run


if __name__ == "__main__":  # one group, for measure_peak: its rows as JSON, last
    label, algorithm, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    chosen = tuple(s for s in sys.argv[4:] if s in (*STORAGES, GROUPED))  # in this order
    print(json.dumps(measure_group(label, algorithm, rounds, "--quick" in sys.argv, chosen)))
