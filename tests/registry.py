"""The optimizers under test, in one place.

Each :class:`Case` builds one optimizer from a library module: ``case.make(rj)``, and,
where optax has the same optimizer under the same names (``case.in_optax``),
``case.make(optax)``. A case says what the tests can check of it: a float64 reference of
its updates, the parts its alias chains, and tags naming the suites it belongs to. A
test asks for cases with :func:`cases` instead of keeping a table of its own, so an
optimizer added here reaches every suite its tags name.

Tags:
  reference: compared with the float64 NumPy transcription (``case.reference``).
  optax: bit for bit with ``case.make(optax)`` under ``jit``, within rounding eagerly.
  fusion: an alias whose fused step is compared, bit for bit, with ``case.parts`` run
    one by one and chained by hand, and with its grouped form.
  migration: trained with one library and continued with the other through orbax.
  complex: takes complex leaves, bit for bit with optax.
  step: ``make_train_step`` equals the hand-written jitted step.
  checkpoint: saved and restored with numpy between steps.
  state: a state type orbax must save and restore (every rule, storage and wrapper).
  rule: wrapped by every wrapper in :data:`WRAPPERS`.

Three tables stay with their suites, as they are not lists of optimizers: the rules as
functions of ``eps`` and ``storage`` with their references (``test_scale_invariance.py``,
``test_storage.py``), the peers' presets against torch, Keras and TF1
(``test_compat.py``), and the 8-device script's chains, whose masks name its own
parameters (``_multidevice_sharding.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rmsjax as rj
from tests import reference


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer under test.

    Attributes:
      name: the test id.
      make: ``module -> transformation``; ``module`` is ``rmsjax`` or, when
        ``in_optax``, ``optax``.
      tags: the suites the case belongs to (see the module docstring).
      in_optax: whether ``make(optax)`` builds optax's same optimizer.
      reference: ``grads -> updates``, float64 (tests/reference.py), or None.
      parts: ``module -> [transformations]``, the chain the alias is made of, or None.
      alias: for a case that is one alias call, ``(alias name, its keyword arguments)``,
        so that ``inject_hyperparams`` can build it; else None.
    """

    name: str
    make: Callable[[Any], Any]
    tags: frozenset[str]
    in_optax: bool = False
    reference: Callable[[list], list] | None = None
    parts: Callable[[Any], list] | None = None
    alias: tuple[str, dict] | None = None


def _case(name, make, tags, **kwargs) -> Case:
    return Case(name, make, frozenset(tags.split()), **kwargs)


def _alias_case(name, alias: str, arguments: dict, tags, **kwargs) -> Case:
    """A case that is one call of ``alias`` with keyword ``arguments``."""

    def make(m):
        return getattr(m, alias)(**arguments)

    return _case(name, make, tags, alias=(alias, arguments), **kwargs)


def _schedule(t):
    return 0.1 * 0.97**t


# Every combination of the flags that change optax's state type, with the three
# momentum settings taken in turn (momentum only adds a TraceState to the chain).
_MOMENTA = [(None, False), (0.9, False), (0.9, True)]
RMSPROP_FLAGS = [
    dict(
        zip(("eps_in_sqrt", "centered", "bias_correction"), values),
        momentum=_MOMENTA[i % 3][0],
        nesterov=_MOMENTA[i % 3][1],
    )
    for i, values in enumerate(itertools.product([True, False], repeat=3))
]


# Masks over trees.mixed_params(), the tree the suites train on.
_NOT_DENSE = {"scalar": True, "dense": False, "nested": True}
_NOT_SCALAR = {"scalar": False, "dense": True, "nested": True}


def _flag_case(flags: dict) -> Case:
    name = "rmsprop[" + "-".join(f"{k}={v}" for k, v in flags.items()) + "]"
    return _case(name, lambda m: m.rmsprop(1e-2, **flags), "migration", in_optax=True)


CASES: tuple[Case, ...] = (
    # ----------------------------------------------------------------- the aliases
    _case(
        "rmsprop",
        lambda m: m.rmsprop(0.01),
        "reference fusion complex optax",
        in_optax=True,
        reference=lambda g: reference.rmsprop(g, 0.01),
        parts=lambda m: [m.scale_by_rms(0.9, 1e-8), m.scale_by_learning_rate(0.01), m.identity()],
    ),
    _alias_case(
        "rmsprop-momentum",
        "rmsprop",
        {"learning_rate": 0.01, "decay": 0.95, "momentum": 0.9},
        "reference fusion step rule",
        in_optax=True,
        reference=lambda g: reference.rmsprop(g, 0.01, decay=0.95, momentum=0.9),
        parts=lambda m: [m.scale_by_rms(0.95, 1e-8), m.scale_by_learning_rate(0.01), m.trace(0.9)],
    ),
    _case(
        "rmsprop-centered-nesterov",
        lambda m: m.rmsprop(0.01, centered=True, momentum=0.5, nesterov=True, eps=1e-4),
        "reference complex",
        in_optax=True,
        reference=lambda g: reference.rmsprop(
            g, 0.01, centered=True, momentum=0.5, nesterov=True, eps=1e-4
        ),
    ),
    _case(
        "rmsprop-schedule",
        lambda m: m.rmsprop(m.schedules.exponential_decay(0.1, 1, 0.97), momentum=0.9),
        "reference",
        in_optax=True,
        reference=lambda g: reference.rmsprop(g, _schedule, momentum=0.9),
    ),
    _case(
        "rmsprop-every-option",
        lambda m: m.rmsprop(
            m.schedules.cosine_decay_schedule(0.01, 40, alpha=0.1),
            decay=0.95,
            eps=1e-6,
            initial_scale=0.1,
            eps_in_sqrt=False,
            centered=True,
            momentum=0.8,
            nesterov=True,
            bias_correction=True,
        ),
        "fusion optax",
        in_optax=True,
        parts=lambda m: [
            m.scale_by_rms(
                0.95,
                1e-6,
                eps_in_sqrt=False,
                initial_scale=0.1,
                bias_correction=True,
                centered=True,
            ),
            m.scale_by_learning_rate(m.schedules.cosine_decay_schedule(0.01, 40, alpha=0.1)),
            m.trace(0.8, nesterov=True),
        ],
    ),
    _case(
        "rmsprop-bias-eps-outside",
        lambda m: m.rmsprop(0.05, bias_correction=True, eps_in_sqrt=False, initial_scale=0.1),
        "complex",
        in_optax=True,
    ),
    _case(
        "rmsprop-bias-nesterov",
        lambda m: m.rmsprop(1e-2, bias_correction=True, momentum=0.9, nesterov=True),
        "state",
    ),
    _case(
        "rmsprop-cosine-centered",
        lambda m: m.rmsprop(
            m.schedules.cosine_decay_schedule(1e-2, 50), centered=True, momentum=0.9
        ),
        "checkpoint state optax",
        in_optax=True,
    ),
    # A schedule from optax in both libraries, so that both see the same values.
    _case(
        "rmsprop-optax-schedule",
        lambda m: m.rmsprop(optax.cosine_decay_schedule(1e-2, 20), momentum=0.9, initial_scale=0.1),
        "migration",
        in_optax=True,
    ),
    *(_flag_case(flags) for flags in RMSPROP_FLAGS),
    _alias_case(
        "adagrad",
        "adagrad",
        {"learning_rate": 0.1},
        "reference fusion migration complex step checkpoint state rule optax",
        in_optax=True,
        reference=lambda g: reference.adagrad(g, 0.1),
        parts=lambda m: [m.scale_by_rss(0.1, 1e-7), m.scale_by_learning_rate(0.1)],
    ),
    _case(
        "adagrad-zero-start",
        lambda m: m.adagrad(0.1, initial_accumulator_value=0.0, eps=0.0),
        "reference fusion",
        in_optax=True,
        reference=lambda g: reference.adagrad(g, 0.1, 0.0, 0.0),
        parts=lambda m: [m.scale_by_rss(0.0, 0.0), m.scale_by_learning_rate(0.1)],
    ),
    # optax divides 0 by 0 on a zero gradient with eps=0; a shared trajectory needs eps.
    _case(
        "adagrad-zero-start-eps",
        lambda m: m.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-5),
        "migration optax",
        in_optax=True,
    ),
    _case(
        "sgd",
        lambda m: m.sgd(0.1),
        "reference fusion migration complex",
        in_optax=True,
        reference=lambda g: reference.sgd(g, 0.1),
        parts=lambda m: [m.identity(), m.scale_by_learning_rate(0.1)],
    ),
    _alias_case(
        "sgd-momentum",
        "sgd",
        {"learning_rate": 0.1, "momentum": 0.9},
        "migration complex state rule",
        in_optax=True,
    ),
    _case(
        "sgd-nesterov",
        lambda m: m.sgd(0.1, momentum=0.9, nesterov=True),
        "reference fusion migration complex optax",
        in_optax=True,
        reference=lambda g: reference.sgd(g, 0.1, momentum=0.9, nesterov=True),
        parts=lambda m: [m.trace(0.9, nesterov=True), m.scale_by_learning_rate(0.1)],
    ),
    # ------------------------------------------------------------------ chains
    _case(
        "clipped-rmsprop",
        lambda m: m.chain(m.clip_by_global_norm(1.0), m.rmsprop(1e-2)),
        "migration complex step checkpoint state",
        in_optax=True,
    ),
    _case(
        "chain-of-parts",
        lambda m: m.chain(
            m.clip(2.0),
            m.add_decayed_weights(1e-3),
            m.scale_by_rms(0.95, 1e-6),
            m.scale_by_learning_rate(1e-2),
            m.trace(0.9),
            m.ema(0.5),
            m.scale(0.5),
            m.identity(),
        ),
        "migration",
        in_optax=True,
    ),
    _case(
        "scale-by-rss",
        lambda m: m.chain(m.scale_by_rss(), m.scale(-0.1)),
        "migration optax",
        in_optax=True,
    ),
    _case(
        "ema",
        lambda m: m.chain(m.ema(0.9), m.scale(-0.1)),
        "complex state optax",
        in_optax=True,
    ),
    _case("trace", lambda m: m.trace(0.9), "optax", in_optax=True),
    _case("ema-biased", lambda m: m.ema(0.9, debias=False), "optax", in_optax=True),
    _case(
        "decayed-weights-adagrad",
        lambda m: m.chain(m.add_decayed_weights(1e-2), m.adagrad(0.1)),
        "complex",
        in_optax=True,
    ),
    # ---------------------------------------------------------------- wrappers
    _case(
        "masked-adagrad",
        lambda m: m.chain(
            m.masked(m.adagrad(0.1), _NOT_DENSE),
            m.masked(m.sgd(0.01), {"scalar": False, "dense": True, "nested": False}),
        ),
        "migration",
        in_optax=True,
    ),
    _case(
        "masked-decay",
        lambda m: m.chain(
            m.masked(m.adagrad(0.1), _NOT_DENSE),
            m.add_decayed_weights(1e-3, mask=_NOT_SCALAR),
        ),
        "migration state",
        in_optax=True,
    ),
    _case(
        "guarded-rmsprop",
        lambda m: m.apply_if_finite(m.rmsprop(1e-2, momentum=0.9), 3),
        "migration state",
        in_optax=True,
    ),
    _case(
        "injected-rmsprop",
        lambda m: m.inject_hyperparams(m.rmsprop)(
            learning_rate=optax.linear_schedule(1e-2, 1e-3, 20), decay=0.9, momentum=0.9
        ),
        "migration state",
        in_optax=True,
    ),
    _case(
        "accumulate-gradients",
        lambda m: m.accumulate_gradients(m.adagrad(0.1), 2),
        "state",
    ),
    _case(
        "grouped-rmsprop",
        lambda m: m.grouped(m.rmsprop(0.01, momentum=0.9)),
        "step state",
    ),
    # ------------------------------------------------- state formats of rmsjax alone
    _case(
        "int8",
        lambda m: m.rmsprop(1e-2, momentum=0.9, centered=True, storage="int8"),
        "state",
    ),
    _case("bfloat16", lambda m: m.adagrad(0.1, storage="bfloat16"), "state"),
    _case(
        "float32-trace",
        lambda m: m.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.float32),
        "state",
    ),
    _case("rowwise", lambda m: m.rowwise_adagrad(0.1), "state"),
    _case("factored", lambda m: m.factored_rmsprop(1e-2, min_dim_size_to_factor=2), "state"),
    _case(
        "factored-momentum",
        lambda m: m.factored_rmsprop(1e-2, momentum=0.9, min_dim_size_to_factor=2),
        "state",
    ),
)


def cases(tag: str) -> dict[str, Case]:
    """The cases tagged ``tag``, by name."""
    found = {case.name: case for case in CASES if tag in case.tags}
    assert found, f"no case is tagged {tag!r}"
    return found


WRAPPERS: dict[str, Callable[[Any], Any]] = {
    # name: the wrapper around an optimizer built by a "rule" case
    "plain": lambda tx: tx,
    "chain": lambda tx: rj.chain(rj.clip_by_global_norm(10.0), tx),
    "apply_if_finite": lambda tx: rj.apply_if_finite(tx, 3),
    "grouped": lambda tx: rj.grouped(tx),
    "masked": lambda tx: rj.masked(tx, _NOT_SCALAR),
    "accumulate_gradients": lambda tx: rj.accumulate_gradients(tx, 2),
    "nested": lambda tx: rj.apply_if_finite(
        rj.masked(rj.grouped(tx), lambda p: jax.tree.map(lambda _: True, p)), 3
    ),
}
"""Every wrapper rmsjax has, and a nesting of three; ``inject_hyperparams`` wraps a
constructor, not a transformation, and is built from the case (:func:`wrapped`)."""


def wrapped(wrapper: str, case: Case) -> Any:
    """``case``'s optimizer inside ``wrapper``: a key of :data:`WRAPPERS`, or
    ``"inject_hyperparams"``, which injects the same alias's arguments."""
    if wrapper == "inject_hyperparams":
        assert case.alias is not None, f"{case.name} is not one alias call"
        alias, arguments = case.alias
        return rj.inject_hyperparams(getattr(rj, alias))(**arguments)
    return WRAPPERS[wrapper](case.make(rj))
