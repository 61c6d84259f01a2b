"""benchmarks/RESULTS.md holds one section per benchmark script; each script rewrites its
own section (between HTML comment markers) and leaves the others as they are."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from importlib import metadata

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"
TITLE = """# Benchmark results

Measured figures, one section per script, each rewritten by its own run:
`python benchmarks/run.py` (step and compile time against optax),
`python benchmarks/memory.py` (optimizer-state memory and training quality per storage
option), `python benchmarks/sharding.py` (state bytes per device, replicated vs ZeRO-1).
"""


def write_section(name: str, markdown: str, path: pathlib.Path = RESULTS) -> None:
    """Replaces (or appends) section ``name`` of ``path`` with ``markdown``, whose
    headings are demoted one level under the file's title."""
    body = "\n".join(
        "#" + line if line.startswith("#") else line for line in markdown.strip().splitlines()
    )
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else TITLE
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def machine_lines() -> list[str]:
    """Two markdown bullets: the machine (CPU model, cores, memory, JAX backend) and the
    software (Python, the packages' versions, rmsjax's version and commit), so that a
    section says where and with what its figures were measured."""
    import jax

    import rmsjax as rj

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            memory = f", {int(handle.readline().split()[1]) / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for package in ("jax", "jaxlib", "optax", "numpy", "torch"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=RESULTS.parent.parent, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # (a run from an edited checkout measured code no commit holds; the results
        # themselves, RESULTS.md and the plots a run writes before this, do not count)
        code = ["rmsjax", "benchmarks", ":!benchmarks/*.md", ":!benchmarks/*.png"]
        if git("status", "--porcelain", "--untracked-files=no", "--", *code):
            commit += ", with uncommitted changes to rmsjax/ or benchmarks/"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return [
        f"- Machine: {cpu}, {os.cpu_count()} CPU cores{memory}; "
        f"JAX backend `{jax.default_backend()}` ({devices}).",
        f"- Python {platform.python_version()}; {', '.join(versions)}; rmsjax "
        f"{rj.__version__} (commit {commit}).",
    ]
