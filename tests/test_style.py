"""The house style holds: ruff clean everywhere, mypy --strict clean on the package and the benchmarks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

# The sources are the same files whichever build runs them.
pytestmark = pytest.mark.one_build


def test_ruff() -> None:
    """`ruff check` finds nothing in quota/, tests/, benchmarks/ and setup.py."""
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "quota", "tests", "benchmarks", "setup.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict() -> None:
    """`mypy` (strict, configured in pyproject.toml) finds nothing in quota/ or benchmarks/."""
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
