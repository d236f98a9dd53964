"""Shared test helpers: tiny fixtures built once per session, and running the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeprep.fixtures import build_fixture


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m moeprep ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "moeprep", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """``tiny(family)`` -> path of that family's tiny fixture, built once per test session."""
    root = tmp_path_factory.mktemp("fixtures")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_fixture(family, root / family)
        return built[family]

    return get
