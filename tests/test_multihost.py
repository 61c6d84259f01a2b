"""Multi-host: the data-parallel step run as 2 processes on localhost gives the numbers of
one process.

examples/data_parallel.py --processes 2 starts two copies of itself that form one JAX
cluster with jax.distributed.initialize (coordinator on 127.0.0.1, a free port, gloo CPU
collectives), 4 CPU devices each. The same script run as one process with 8 devices, and
the one-device run inside it, are the references.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# Starts two processes that talk over loopback: outside the quick loop.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data_parallel.py"


def run_example(*args: str, timeout: int = 300) -> str:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the example sets the device count it needs
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr[-20000:]}"
    assert result.returncode == 0, f"{EXAMPLE.name} {' '.join(args)}: {result.returncode}\n{output}"
    assert "same parameters as one device: yes" in result.stdout, output
    return result.stdout


def state_bytes_per_device(output: str) -> dict:
    """The example's last table column, per run: optimizer-state bytes on each device."""
    rows = {}
    for name in ("one device", "replicated", "ZeRO-1", "shard_map"):
        line = next(line for line in output.splitlines() if line.startswith(name + " "))
        rows[name] = int(line.split()[-1].replace(",", ""))
    return rows


def test_two_processes_give_the_numbers_of_one(tmp_path):
    one = tmp_path / "one_process.npz"
    two = tmp_path / "two_processes.npz"
    out_one = run_example("--out", str(one))
    out_two = run_example("--processes", "2", "--timeout", "150", "--out", str(two))
    assert "1 process(es), 8 devices (8 here)" in out_one, out_one
    assert "2 process(es), 8 devices (4 here)" in out_two, out_two

    for out in (out_one, out_two):
        held = state_bytes_per_device(out)
        # ZeRO-1: 1/8 of the state per device, plus the replicated step counts (2 x 4 B).
        assert held["ZeRO-1"] == (held["replicated"] - 8) // 8 + 8, held
        assert held["replicated"] == held["one device"] == held["shard_map"], held

    single, multi = np.load(one), np.load(two)
    assert sorted(single.files) == sorted(multi.files)
    runs = {name.split("/")[0] for name in single.files}
    assert runs == {"one device", "replicated", "ZeRO-1", "shard_map"}, runs
    for name in single.files:
        # The one-device runs are the same program on one device: bit for bit.
        if name.startswith("one device/"):
            np.testing.assert_array_equal(multi[name], single[name], err_msg=name)
            continue
        # Across 2 processes the all-reduce adds in another order than within one.
        np.testing.assert_allclose(multi[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
        reference = single["one device/" + name.split("/")[1]]
        np.testing.assert_allclose(multi[name], reference, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.array_equal(multi[name], np.zeros_like(multi[name])), name
