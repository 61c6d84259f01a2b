"""``flax.serialization`` for rmsjax's own state types, whenever flax is imported.

flax saves a state by converting each node with a converter it finds by the node's exact
type; a node of a type it does not know reaches msgpack as it is, which refuses it
("can not serialize 'QuantizedArray' object"). Three rmsjax types need converters:
:class:`~rmsjax._src.hyperparams_state.Hyperparams` (a dict subclass), :class:`QuantizedArray`
(int8 state) and :class:`~rmsjax._src.base.TreeStructure` (a grouped state's static
structure, which saves nothing). rmsjax does not import flax: where flax is installed,
:func:`install` registers them at once if ``flax.serialization`` is already imported,
and otherwise right after it is, whenever that happens.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

from rmsjax._src import base, hyperparams_state, quantization

_MODULE = "flax.serialization"


def register(serialization: Any) -> None:
    """Registers the converters with the module ``flax.serialization``."""
    to_state, from_state = serialization.to_state_dict, serialization.from_state_dict

    def hyperparams_to_state(entries: hyperparams_state.Hyperparams) -> dict:
        return {str(k): to_state(v) for k, v in entries.items()}

    def hyperparams_from_state(target: hyperparams_state.Hyperparams, state: dict) -> Any:
        return hyperparams_state.Hyperparams(
            {k: from_state(v, state[str(k)], str(k)) for k, v in target.items()}
        )

    def quantized_to_state(q: quantization.QuantizedArray) -> dict:
        return {"codes": to_state(q.codes), "scale": to_state(q.scale)}

    def quantized_from_state(target: quantization.QuantizedArray, state: dict) -> Any:
        if not isinstance(state, dict) or set(state) != {"codes", "scale"}:
            held = f"{type(state).__name__} of shape {getattr(state, 'shape', '?')}"
            if isinstance(state, dict):
                held = f"dict with keys {sorted(state)}"
            raise ValueError(
                "rmsjax: flax.serialization.from_state_dict: the target holds int8 state "
                f"(a QuantizedArray of shape {target.shape}: codes and scales) where the "
                f"saved state holds a {held}; restore into the state of an optimizer with "
                "the storage option the checkpoint was saved with"
            )
        codes = from_state(target.codes, state["codes"], "codes")
        scale = from_state(target.scale, state["scale"], "scale")
        return quantization.QuantizedArray(codes, scale, target.shape, target.signed)

    converters = [
        (hyperparams_state.Hyperparams, hyperparams_to_state, hyperparams_from_state),
        (quantization.QuantizedArray, quantized_to_state, quantized_from_state),
        (base.TreeStructure, lambda structure: {}, lambda target, state: target),
    ]
    for kind, to_state_dict, from_state_dict in converters:
        serialization.register_serialization_state(
            kind, to_state_dict, from_state_dict, override=True
        )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``flax.serialization`` as the other finders do, and registers the converters
    once the module has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _MODULE:
            return None
        if self in sys.meta_path:  # needed once: flax.serialization is imported once
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            register(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Registers the converters now, or after ``flax.serialization`` is imported (only
    where flax is installed: nothing is imported here)."""
    if _MODULE in sys.modules:
        register(sys.modules[_MODULE])
    elif importlib.util.find_spec("flax") is not None and not any(
        isinstance(finder, _AfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport())
