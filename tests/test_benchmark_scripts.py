"""The benchmark scripts still run against the library as it is (they use the engine's internals,
so a change there can break them without any test of the library noticing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import loompy

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_floor_and_deflate_libraries_run_on_a_small_file(tmp_path):
    path = tmp_path / "small.loom"
    m = (np.random.default_rng(2).random((200, 300)) < 0.1).astype(np.float64)  # (a float64 chunk: 32 KB)
    loompy.create(path, m, {"Gene": np.arange(200)}, {"CellID": np.arange(300)}).close()
    floor = _run("floor.py", str(path), "--repeats", "1")
    rows = [line for line in floor.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows][-7:] == ["ds[:, :]", "ds[:, :] into memory already faulted in",
                                                           "sparse()", "scan rows (512)",
                                                           "scan columns (512)", "map([np.mean, np.std])",
                                                           "map over columns"]
    assert [r.split("|")[1].strip() for r in rows][2:4] == ["floor, 2 threads", "floor, 2 processes"]
    assert all(float(r.split("|")[2]) > 0 for r in rows[1:])
    libraries = _run("deflate_libraries.py", str(path), "--chunks", "20")
    assert {"zlib", "libdeflate", "isal"} <= {line.split("|")[1].strip() for line in libraries.splitlines()
                                             if line.startswith("| ")}
