"""The README's benchmark commands run as written: ``python benchmarks/x.py``.

Such a script has ``benchmarks/`` on its path, not the checkout, so the
repo-only tooling it imports (``trio_dev``, ``benchmarks.common``) is found
only through the path file ``scripts/setup.sh`` puts into the development
environment. Without ``PYTHONPATH``, from another directory, ``--help`` of a
script of each import style must work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["flops.py", "startup.py", "soak.py"])
def test_benchmark_script_runs_without_pythonpath(script: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage:" in run.stdout
