"""The contenders of the speed benchmark (``run.py``): the algorithms measured, and for
each one the ways to run its step: optax, rmsjax (per-leaf and grouped state), the
stateless ``floor``, and torch.optim when torch is importable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

import rmsjax as rj

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
