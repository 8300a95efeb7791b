"""The reference loompy 3.0.8, installed in its own virtual environment and driven through subprocesses.

It shares the import name ``loompy`` with this project, so it never enters our interpreter: scripts run
in the venv's Python and exchange results as JSON (small values) or files (.loom, .npz).
The venv is created once and cached (``LOOMPY_REFERENCE_VENV``, default ``~/.cache/loompy-reference``).
Used by tests and by ``benchmarks/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REFERENCE_VERSION = "3.0.8"
VENV = Path(os.environ.get("LOOMPY_REFERENCE_VENV", Path.home() / ".cache" / "loompy-reference" / REFERENCE_VERSION))


def python() -> Path:
    return VENV / "bin" / "python"


def environment() -> dict[str, str]:
    """This process's environment without what would make the reference's Python import anything
    but its own packages (PYTHONPATH pointing at this project would load our loompy in its place)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def ensure_reference() -> Path:
    """Create the venv and install loompy==3.0.8 into it (once); returns its Python."""
    marker = VENV / ".ready"
    if marker.exists():
        return python()
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python()), "-m", "pip", "install", "-q", f"loompy=={REFERENCE_VERSION}"], check=True,
                   env=environment())
    check = run("import loompy; print(loompy.__version__)", parse_json=False)
    if check.strip() != REFERENCE_VERSION:
        raise RuntimeError(f"reference venv has loompy {check!r}, expected {REFERENCE_VERSION}")
    marker.write_text(REFERENCE_VERSION)
    return python()


def run(script: str, *args: str, parse_json: bool = True, timeout: float = 600):
    """Run ``script`` in the reference venv; with ``parse_json``, the last stdout line is parsed as JSON."""
    proc = subprocess.run(
        [str(python()), "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=timeout, cwd="/", env=environment(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"reference script failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    if not parse_json:
        return proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
