"""The public names of rmsjax and where their documentation comes from.

Shared by the Sphinx extension (which fails the strict build on a gap) and by
tests/test_docs.py (which checks the same without Sphinx installed). Public means listed
in ``__all__`` of ``rmsjax``, ``rmsjax.compat`` or ``rmsjax.schedules``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import types

PUBLIC_MODULES = ("rmsjax", "rmsjax.compat", "rmsjax.schedules")


def public_names() -> list[str]:
    """Every public name, qualified: ``rmsjax.rmsprop``, ``rmsjax.compat.torch_rmsprop``."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return names


def resolve(qualified_name: str) -> object:
    module_name, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def attribute_docstrings(path: pathlib.Path) -> dict[str, str]:
    """Docstrings written as a string right after a module-level assignment (also inside
    ``try`` and ``if``), the form Sphinx reads for data: ``Params = Any`` on one line, the
    string on the next."""
    found = {}

    def visit(body: list[ast.stmt]) -> None:
        for statement, following in zip(body, body[1:] + [None]):
            for block in ("body", "orelse", "finalbody"):
                visit(getattr(statement, block, []))
            for handler in getattr(statement, "handlers", []):
                visit(handler.body)
            if isinstance(statement, ast.Assign | ast.AnnAssign) and (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                assign = isinstance(statement, ast.Assign)
                for target in statement.targets if assign else [statement.target]:
                    if isinstance(target, ast.Name):
                        found[target.id] = inspect.cleandoc(following.value.value)

    visit(ast.parse(path.read_text()).body)
    return found


def defining_module(qualified_name: str) -> str:
    """The module whose source assigns the name: for a re-export
    (``from rmsjax._src.base import Params as Params``) the module it comes from."""
    module_name, _, name = qualified_name.rpartition(".")
    module = importlib.import_module(module_name)
    for statement in ast.parse(pathlib.Path(module.__file__).read_text()).body:
        if isinstance(statement, ast.ImportFrom) and statement.module:
            if any((alias.asname or alias.name) == name for alias in statement.names):
                return statement.module
    return module_name


def data_docstring(qualified_name: str) -> str | None:
    """The attribute docstring of a public name that is data (a type alias, a version)."""
    module = importlib.import_module(defining_module(qualified_name))
    name = qualified_name.rpartition(".")[2]
    return attribute_docstrings(pathlib.Path(module.__file__)).get(name)


def is_data(obj: object) -> bool:
    """Whether a public object is data, documented by an attribute docstring, rather
    than a function, class or module with a ``__doc__`` of its own."""
    own_code = isinstance(obj, types.FunctionType | types.ModuleType) or (
        isinstance(obj, type) and obj.__module__.startswith("rmsjax")
    )
    return not own_code


def docstring(qualified_name: str) -> str | None:
    """The docstring a reader sees for the name, or None where it has none of its own."""
    obj = resolve(qualified_name)
    if is_data(obj):
        return data_docstring(qualified_name)
    doc = obj.__doc__
    # A NamedTuple without a docstring gets a generated one: "Name(field, ...)".
    if not doc or (isinstance(obj, type) and doc.startswith(f"{obj.__name__}(")):
        return None
    return inspect.cleandoc(doc)


def undocumented() -> list[str]:
    """Public names without a docstring of their own."""
    return [name for name in public_names() if not docstring(name)]


def type_alias_spellings() -> dict[str, str]:
    """How rmsjax's sources spell each public type alias in annotations (``Params``,
    ``base.Params``), mapped to its public name (``rmsjax.Params``)."""
    spellings = {}
    for name in public_names():
        module = defining_module(name)
        if is_data(resolve(name)) and module.startswith("rmsjax._src."):
            short = name.rpartition(".")[2]
            spellings[short] = spellings[f"{module.rpartition('.')[2]}.{short}"] = name
    return spellings
