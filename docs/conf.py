"""Sphinx configuration of rmsjax's documentation site.

Build it strictly (what CI runs; a warning, a broken reference or an undocumented public
name fails the build):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent / "_ext"))

import public_api  # noqa: E402  (docs/_ext/public_api.py)

import rmsjax  # noqa: E402

project = "rmsjax"
author = "the rmsjax authors"
copyright = "the rmsjax authors"  # noqa: A001
release = rmsjax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the docstrings' Args:, Returns:, Attributes: sections
    "sphinx.ext.mathjax",  # their .. math:: blocks and :math: roles
    "sphinx-mathjax-offline",  # MathJax served with the site: no CDN, works offline
    "sphinx.ext.viewcode",
    "myst_parser",  # the guides are Markdown
    "api_reference",  # docs/_ext/api_reference.py: coverage check, public references
    "included_pages",  # docs/_ext/included_pages.py: links to benchmarks/RESULTS.md
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
templates_path = []

# Every reference must resolve: broken ones are warnings, and the build runs with -W.
nitpicky = True
nitpick_ignore_regex = [
    # Other projects' types in signatures; their sites are not reachable from every
    # machine that builds this one, so they are shown unlinked.
    ("py:.*", r"(jax|jaxlib|numpy|np|optax|chex|flax|equinox)(\..*)?"),
    ("py:.*", r"collections\.abc\..*"),
    # Private names in signatures, shown unlinked: the protocols of GradientTransformation's
    # two fields, and masks.py's alias for a mask tree.
    ("py:class", r"Transform(Init|Update)Fn|Mask"),
    # quantize's docstring points at the module that explains the 8-bit format, which is
    # private; the memory guide (docs/memory.md) is the public place for that text.
    ("py:mod", r"rmsjax\._src\.storage"),
]

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
# Signatures show the public type aliases by name (``ScalarOrSchedule``), linked, instead
# of what they expand to, however the source spells them (``base.ScalarOrSchedule``);
# api_reference.py then drops the module from every public name in a signature.
autodoc_type_aliases = public_api.type_alias_spellings()
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False  # a state's fields as entries of their own, in the index
napoleon_attr_annotations = False  # their docstrings say what the fields hold

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
suppress_warnings = []

html_theme = "furo"
html_title = "rmsjax"
html_static_path = []
html_show_sourcelink = False
