"""The documentation: the guides' Python blocks run, every public name has a docstring
and a place in the API reference, the gallery shows every picture, and (with the docs
extra, ``pip install -e ".[docs]"``) the site builds strictly and renders in Chromium.

The guides mark what their blocks need with HTML comments, which neither a code host nor
the site shows:

- ``<!-- test: CODE -->``: Python run at that point, before or after the blocks around
  it: what a fragment leaves to the reader (a model, a loss), or a call of what the block
  above defined. The blocks and these run in order in one namespace per page, in a
  temporary working folder.
- ``<!-- no-run: REASON -->`` right before a block: the block is only compiled.
- ``<!-- no-run-page: REASON -->``: the page's blocks are run by another test (named in
  the reason) and only compiled here.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import zlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
PIECE = re.compile(
    r"<!--\s*(?P<kind>no-run-page|no-run|test):(?P<body>.*?)-->"
    r"|^(?P<indent> *)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```",
    re.M | re.S,
)
MOST_SKIPPED_BLOCKS = 2
OPTIONAL_PACKAGES = {"flax", "equinox", "orbax", "optax", "matplotlib", "sklearn"}


@dataclasses.dataclass
class Snippet:
    line: int  # where the code starts in the page, so tracebacks point into it
    code: str
    kind: str  # "block", "test" (hidden) or "no-run" (a block that is only compiled)
    reason: str = ""


@dataclasses.dataclass
class Page:
    path: pathlib.Path
    snippets: list[Snippet]
    no_run_reason: str | None  # set by <!-- no-run-page: ... -->

    @property
    def blocks(self) -> list[Snippet]:
        return [s for s in self.snippets if s.kind != "test"]


def parse(path: pathlib.Path) -> Page:
    text = path.read_text()
    snippets, pending_reason, no_run_reason, last_end = [], None, None, 0
    for match in PIECE.finditer(text):
        between = text[last_end : match.start()]
        if pending_reason is not None and between.strip():
            raise AssertionError(f"{path.name}: a no-run marker is not right before a block")
        line = text.count("\n", 0, match.start()) + 1
        if match["kind"] == "no-run-page":
            no_run_reason = match["body"].strip()
        elif match["kind"] == "no-run":
            pending_reason = match["body"].strip()
        elif match["kind"] == "test":
            reason, _, code = match["body"].partition("\n")
            snippets.append(Snippet(line + 1, textwrap.dedent(code), "test", reason.strip()))
        else:
            code = textwrap.dedent(match["code"])  # a block inside a list item is indented
            kind = "block" if pending_reason is None else "no-run"
            snippets.append(Snippet(line + 1, code, kind, pending_reason or ""))
            pending_reason = None
        last_end = match.end()
    if pending_reason is not None:
        raise AssertionError(f"{path.name}: a no-run marker is not followed by a block")
    return Page(path, snippets, no_run_reason)


def compiled(page: Page, snippet: Snippet):
    # Leading newlines put the code at its line in the page, for tracebacks.
    return compile("\n" * (snippet.line - 1) + snippet.code, str(page.path), "exec")


def missing_package(error: ModuleNotFoundError) -> str | None:
    top = (error.name or "").partition(".")[0]
    if top in OPTIONAL_PACKAGES and importlib.util.find_spec(top) is None:
        return top
    return None


PAGES = [parse(path) for path in GUIDES]


@pytest.mark.parametrize("page", [p for p in PAGES if p.blocks], ids=lambda p: p.path.name)
def test_guide_code_blocks_run(page: Page, tmp_path, monkeypatch):
    """Each guide's Python blocks run, in order, as a reader would paste them."""
    for snippet in page.snippets:
        compiled(page, snippet)  # every block parses, run or not
    if page.no_run_reason:
        pytest.skip(f"{page.path.name}: {page.no_run_reason}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.path.stem}"}
    for snippet in page.snippets:
        if snippet.kind == "no-run":
            continue
        try:
            exec(compiled(page, snippet), namespace)
        except ModuleNotFoundError as error:
            package = missing_package(error)
            if package is None:
                raise
            pytest.skip(
                f"{page.path.name}:{snippet.line} needs {package}, which the examples "
                'extra installs (pip install -e ".[examples]")'
            )


def test_few_blocks_are_skipped_and_each_says_why():
    skipped = [(p.path.name, s) for p in PAGES for s in p.blocks if s.kind == "no-run"]
    assert len(skipped) <= MOST_SKIPPED_BLOCKS, [f"{name}:{s.line}" for name, s in skipped]
    assert all(len(s.reason.split()) >= 3 for _, s in skipped), skipped
    pages = {p.path.name: p.no_run_reason for p in PAGES if p.no_run_reason}
    # Only the scale-out guide is run elsewhere: its blocks need 8 devices.
    assert set(pages) <= {"scale_out.md"}, pages
    assert all("tests/" in reason for reason in pages.values()), pages


# ------------------------------------------------------------------ the API reference


def load_public_api():
    spec = importlib.util.spec_from_file_location("public_api", DOCS / "_ext" / "public_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


public_api = load_public_api()
DIRECTIVE = re.compile(
    r"^\.\. (?:auto(?:function|class|data|module)|module|currentmodule):: (\S+)", re.M
)


def reference_pages_list() -> set[str]:
    """The qualified names that docs/api/*.rst document (their auto* directives)."""
    names = set()
    for page in sorted((DOCS / "api").glob("*.rst")):
        module = "rmsjax"
        for match in DIRECTIVE.finditer(page.read_text()):
            directive, target = match[0].split("::")[0], match[1]
            if "module" in directive:
                module = target
                names.add(target)
            else:
                names.add(target if target.startswith("rmsjax.") else f"{module}.{target}")
    return names


def test_every_public_name_has_a_docstring():
    assert public_api.undocumented() == []


def test_every_public_name_is_on_a_reference_page():
    listed = reference_pages_list()
    assert [n for n in public_api.public_names() if n not in listed] == []
    assert sorted(listed - set(public_api.public_names()) - {"rmsjax"}) == []


def test_the_readme_api_table_gives_the_real_signatures():
    import ast
    import inspect

    import rmsjax as rj

    table = (ROOT / "README.md").read_text().partition("## API")[2].partition("\n## ")[0]
    signatures = re.findall(r"`(\w+)\(([^`]*?=[^`]*?)\)`", table)  # those with defaults
    assert len(signatures) >= 5
    kinds = {
        "args": inspect.Parameter.POSITIONAL_OR_KEYWORD,
        "kwonlyargs": inspect.Parameter.KEYWORD_ONLY,
    }
    for name, arguments in signatures:
        listed = ast.parse(f"def f({arguments}): pass").body[0].args
        real = inspect.signature(getattr(rj, name)).parameters
        shown = []
        for field, kind in kinds.items():
            given = getattr(listed, field)
            defaults = listed.defaults if field == "args" else listed.kw_defaults
            defaults = [None] * (len(given) - len(defaults)) + list(defaults)
            for argument, default in zip(given, defaults, strict=True):
                parameter = real[argument.arg]
                assert parameter.kind == kind, (name, argument.arg)
                if default is not None:
                    assert parameter.default == ast.literal_eval(default), (name, argument.arg)
                shown.append(argument.arg)
        # the table may leave arguments out (storage), but not reorder them
        assert shown == [n for n in real if n in shown], (name, shown, list(real))


def test_gallery_shows_every_picture():
    text = (DOCS / "gallery.md").read_text() + (ROOT / "README.md").read_text()
    missing = [p.name for p in sorted((DOCS / "gallery").glob("*.png")) if p.name not in text]
    assert missing == []


# ------------------------------------------------------------- the site (docs extra)


def docs_extra_missing() -> str | None:
    for module in ("sphinx", "myst_parser", "furo"):
        if importlib.util.find_spec(module) is None:
            return f'{module} is not installed: pip install -e ".[docs]"'
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    """The site, built as the README says, strictly: any warning fails."""
    reason = docs_extra_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    result = subprocess.run(
        [*command, str(DOCS), str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def inventory_names(site: pathlib.Path) -> set[str]:
    """The Python objects in the site's objects.inv (Sphinx's inventory format v2)."""
    data = (site / "objects.inv").read_bytes()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    return {line.split()[0] for line in body.splitlines() if line.split()[1].startswith("py:")}


@pytest.mark.slow
def test_site_documents_every_public_name(site):
    assert set(public_api.public_names()) - inventory_names(site) == set()


@pytest.mark.slow
def test_equations_reach_the_pages_with_mathjax_served_from_the_site(site):
    # README: "equations rendered". The browser check below needs Chromium, which CI
    # lacks; this one reads the built HTML: the docstrings' math is marked up for
    # MathJax, and MathJax is loaded from the site itself (no CDN)
    page = (site / "api" / "optimizers.html").read_text()
    assert page.count('class="math notranslate nohighlight"') >= 3
    scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page, re.I)
    assert scripts and not any(src.startswith(("http:", "https:", "//")) for src in scripts)
    assert all((site / "api" / src).resolve().is_file() for src in scripts), scripts


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(site):
    """The site served over HTTP on the loopback address, like the README's command."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def browse(url: str, screenshot: pathlib.Path) -> str:
    """Opens ``url`` in headless Chromium, saves a screenshot and returns the page's DOM
    after its scripts (MathJax) ran."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        "--virtual-time-budget=15000",
    ]
    for extra in ([f"--screenshot={screenshot}"], ["--dump-dom"]):
        result = subprocess.run(
            [*command, *extra, url], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000, screenshot
    return result.stdout


@pytest.mark.slow
def test_pages_render_in_chromium(served, site):
    """The home page, the rmsprop reference and the gallery as a reader sees them; the
    screenshots are left in out/docs/ to look at."""
    if chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    shots = ROOT / "out" / "docs"
    shots.mkdir(parents=True, exist_ok=True)

    home = browse(f"{served}/index.html", shots / "home.png")
    assert "Two commands" in home and "Exact." in home
    assert 'href="porting.html#from-optax"' in home  # the README's links, on the site

    rmsprop = browse(f"{served}/api/optimizers.html", shots / "rmsprop.png")  # its first entry
    assert 'id="rmsjax.rmsprop"' in rmsprop
    assert rmsprop.count("<mjx-container") >= 3, "MathJax did not typeset the equations"
    assert "\\(" not in rmsprop.partition('id="rmsjax.rmsprop"')[2], "raw TeX is left"

    gallery = browse(f"{served}/gallery.html", shots / "gallery.png")
    assert gallery.count("<table") >= 2
    for picture in sorted((DOCS / "gallery").glob("*.png")):
        assert picture.name in gallery, picture.name
        assert (site / "_images" / picture.name).stat().st_size == picture.stat().st_size
