"""The measurements of one row of the speed benchmark (``run.py``): the pytrees, the
compile time of each contender, and its step time timed in turn with the others and
with a streaming kernel, from which the bandwidth fractions come."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from alternating import median_seconds, step_runner
from speed_contenders import (
    ALGORITHMS,
    FLOAT32_BYTES,
    FLOOR,
    Contender,
    TorchRunner,
    jax_contenders,
)

TORCH_EVERY = 4  # torch is called in one round of this many: it is slow and only a reference


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
        params = copy_tree(params0)
        run = step_runner(jax.jit(step, donate_argnums=(0, 1)), params, init(params), grads)
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
    torch_rounds = {name: TORCH_EVERY for name in runners if name.startswith("torch")}
    medians = median_seconds(runners, rounds, every=torch_rounds)
    moved = (ALGORITHMS[algorithm]["reads"] + ALGORITHMS[algorithm]["writes"]) * FLOAT32_BYTES
    stream_gbs = 3 * FLOAT32_BYTES * stream_elements / medians.pop(STREAM) / 1e9
    row.stream_gbs = stream_gbs
    for name, seconds in medians.items():
        row.step_ms[name] = seconds * 1e3
        if name != FLOOR:
            row.bandwidth[name] = moved * count * size / seconds / 1e9 / stream_gbs
    del runners
    gc.collect()
    return row
