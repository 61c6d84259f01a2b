"""The contenders of the speed benchmark (``run.py``): the algorithms measured, and for
each one the ways to run its step: optax, rmsjax (per-leaf and grouped state), the
stateless ``floor``, and torch.optim when torch is importable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
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
STACKED = "stacked"  # grouped's layout with textbook arithmetic and nothing else
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
        Contender(STACKED, lambda: stacked_step(algorithm, block_size)),
        Contender(FLOOR, floor_make),
    ]


def stacked_step(algorithm: str, block_size: int | None) -> tuple[Callable, Callable]:
    """``rj.grouped``'s layout with nothing else of rmsjax: the same blocks of stacked
    same-shaped leaves (``rj.leaf_blocks``), optax's arithmetic on each block, each row
    added to its parameter, and none of rmsjax's range handling, checks or ordering of
    the blocks. What the layout itself costs, so that a figure between it and
    ``rmsjax.grouped`` is rmsjax's own work. Not an optimizer to use: a moment past
    float32's range is lost here, as in optax."""
    decay = 0.9
    eps = 1e-7 if algorithm == "adagrad" else 1e-8  # optax's defaults
    momentum = algorithm == "rmsprop_momentum"

    def blocks(tree):
        return rj.leaf_blocks(tree, block_size=block_size)

    def init(params):
        leaves = jax.tree.leaves(params)
        first = 0.1 if algorithm == "adagrad" else 0.0  # optax's initial values
        moments = tuple(
            jnp.full((len(b), *leaves[b[0]].shape), first, leaves[b[0]].dtype)
            for b in blocks(params)
        )
        return (moments, jax.tree.map(jnp.zeros_like, moments)) if momentum else (moments,)

    def step(params, state, grads):
        # optax's formulas in its order: scale_by_rms or scale_by_rss, then
        # scale_by_learning_rate, then trace, then apply_updates
        leaves, treedef = jax.tree.flatten(params)
        gs = jax.tree.leaves(grads)
        new_params, new_state = list(leaves), [[] for _ in state]
        for k, block in enumerate(blocks(params)):
            g = jnp.stack([gs[i] for i in block])
            if algorithm == "adagrad":
                nu = g * g + state[0][k]
                u = jnp.where(nu > 0, jax.lax.rsqrt(nu + eps), 0.0) * g
            else:
                nu = (1 - decay) * (g * g) + decay * state[0][k]
                u = g * jax.lax.rsqrt(nu + eps)
            new_state[0].append(nu)
            u = -LEARNING_RATE * u
            if momentum:
                u = u + 0.9 * state[1][k]
                new_state[1].append(u)
            for row, i in enumerate(block):
                new_params[i] = leaves[i] + u[row]
        return treedef.unflatten(new_params), tuple(tuple(s) for s in new_state)

    return step, init


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
