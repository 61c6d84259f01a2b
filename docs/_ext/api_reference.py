"""Sphinx glue for rmsjax's API reference.

- Fails the build (a warning, an error under ``-W``) when a public name has no
  docstring or is documented on no page of the reference.
- Gives re-exported type aliases (``rmsjax.Params = Any``) the docstring written under
  their assignment in ``rmsjax/_src``, instead of the docstring of ``typing.Any``.
- Shows names in signatures without their module (``GradientTransformation``, not
  ``base.GradientTransformation``), and keeps public type aliases by name.
- Resolves references written against a private module or from inside a submodule
  (``rmsjax._src.base.GradientTransformation`` in a signature, ``:func:`rmsprop``` in a
  ``rmsjax.compat`` docstring) to the public name's entry.
"""

from __future__ import annotations

import functools
import pkgutil
import re

import public_api
from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


@functools.cache
def private_modules() -> frozenset[str]:
    """The short names of rmsjax's private modules (``base``), as signatures spell the
    types they import from them (``base.Updates``)."""
    import rmsjax._src

    return frozenset(info.name for info in pkgutil.iter_modules(rmsjax._src.__path__))


@functools.cache
def module_prefix() -> re.Pattern:
    """What qualifies a name in a signature without telling a reader anything:
    ``rmsjax.``, ``rmsjax._src.base.``, ``base.``."""
    private = "|".join(sorted(private_modules()))
    public = r"rmsjax\.(?:_src\.(?:\w+\.)+|compat\.|schedules\.)?"
    return re.compile(rf"\b(?:{public}|(?:{private})\.)(?=\w)")


def use_attribute_docstring(app, what, name, obj, options, lines) -> None:
    if what == "data" and name in public_api.public_names():
        doc = public_api.data_docstring(name)
        if doc is not None:
            lines[:] = doc.splitlines()


def short_signature(app, what, name, obj, options, signature, return_annotation):
    """``chain(*transforms: GradientTransformation) -> GradientTransformation`` rather than
    ``base.GradientTransformation``; each name stays linked to its entry."""
    texts = (signature, return_annotation)
    return tuple(None if text is None else module_prefix().sub("", text) for text in texts)


def check_coverage(app: Sphinx, env) -> None:
    documented = env.get_domain("py").objects
    for name in public_api.public_names():
        if not public_api.docstring(name):
            logger.warning("public name %s has no docstring", name, type="rmsjax", subtype="api")
        if name not in documented:
            logger.warning(
                "public name %s is on no page of the API reference (docs/api/*.rst)",
                name,
                type="rmsjax",
                subtype="api",
            )


def public_target(target: str, documented) -> str | None:
    """The documented public name a reference means, or None: for a name written bare or
    qualified by a private module (``rmsjax._src.base.X``, ``base.X``), or a public name
    looked up as another type (a type alias, which is data, named as a class)."""
    prefix, _, name = target.rpartition(".")
    if prefix in public_api.PUBLIC_MODULES:
        return target if target in documented else None
    if prefix and not (prefix.startswith("rmsjax._src.") or prefix in private_modules()):
        return None
    for module_name in public_api.PUBLIC_MODULES:
        if f"{module_name}.{name}" in documented:
            return f"{module_name}.{name}"
    return None


def resolve_public(app: Sphinx, env, node, contnode) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = public_target(node["reftarget"], domain.objects)
    if target is None:
        return None
    # "obj": a type alias is data, but a signature refers to it as a class.
    return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", target, node, contnode)


def setup(app: Sphinx) -> dict:
    app.connect("autodoc-process-docstring", use_attribute_docstring)
    app.connect("autodoc-process-signature", short_signature)
    app.connect("env-check-consistency", check_coverage)
    app.connect("missing-reference", resolve_public)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
