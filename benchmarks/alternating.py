"""The timing harness the benchmarks share: every contender called once per round, in an
order that rotates from round to round, and the median of each one's single calls, so that
the load of other processes on a shared machine falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax


def step_runner(step: Callable, params: Any, state: Any, grads: Any) -> Callable[[], None]:
    """One call of a jitted ``step(params, state, grads) -> (params, state)`` that donates
    its parameters and state: each call steps from the last call's results and blocks until
    they are ready."""
    carry = [params, state]

    def run() -> None:
        carry[:] = jax.block_until_ready(step(carry[0], carry[1], grads))

    return run


def median_seconds(
    runners: Mapping[str, Callable[[], None]],
    rounds: int,
    every: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Calls each runner once per round, the order shifted by one each round, and returns
    the median seconds of each runner's calls, in the order of ``runners``. A runner named
    in ``every`` is called in one round of that many only (slow references). Each runner
    must block until its work is done."""
    every = every or {}
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(rounds):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            if r % every.get(name, 1):
                continue
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
