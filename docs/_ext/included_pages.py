"""Links to Markdown files outside docs/ that a page of the site includes.

The guides link to ``../benchmarks/RESULTS.md`` so that they read right on a code host;
on the site that file is the body of ``benchmarks.md`` (an ``{include}``). This sends
such links to the including page instead of leaving them broken.
"""

from __future__ import annotations

import pathlib
import re

from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util.nodes import NodeMatcher

INCLUDE = re.compile(r"^```\{include\}\s+(\S+)", re.M)


def including_pages(srcdir: pathlib.Path) -> dict[str, str]:
    """Maps each included Markdown file (absolute, without suffix) to the page that
    includes it."""
    pages = {}
    for page in sorted(srcdir.rglob("*.md")):
        for target in INCLUDE.findall(page.read_text()):
            included = (page.parent / target).resolve()
            docname = page.relative_to(srcdir).with_suffix("").as_posix()
            pages.setdefault(str(included.with_suffix("")), docname)
    return pages


class LinkToIncludingPage(SphinxPostTransform):
    default_priority = 8  # before MyST resolves its document links (9)

    def run(self, **kwargs) -> None:
        pages = including_pages(pathlib.Path(self.env.srcdir))
        matcher = NodeMatcher(addnodes.pending_xref, refdomain="doc", reftype="myst")
        for node in self.document.findall(matcher):
            page = pages.get(str(pathlib.Path(node["reftarget"]).resolve()))
            if page is not None and node["reftarget"] not in self.env.all_docs:
                node["reftarget"] = page


def setup(app: Sphinx) -> dict:
    app.add_post_transform(LinkToIncludingPage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
