"""ruff and mypy over the code, so that CI (which runs only pytest) holds the style line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "daemon", "numba_kernels", "tests", "benchmarks"],
        ["mypy", "daemon", "numba_kernels"],
    ],
    ids=["ruff", "mypy"],
)
def test_clean(cmd: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
