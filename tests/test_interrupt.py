"""A conversion killed (SIGKILL) at any point leaves no output folder or a complete one, and running
it again gives output byte-identical to an uninterrupted run."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeprep.fixtures import build_fixture
from tests.conftest import run_cli


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def medium_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layer with gpt-oss-20b expert dims (~0.4 GB): long enough to be killed mid-write."""
    return build_fixture("gpt-oss", tmp_path_factory.mktemp("medium") / "src", preset="20b", num_layers=1)


def test_sigkill_at_random_points_never_leaves_a_complete_looking_partial(medium_gpt_oss: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert (
        run_cli("convert", medium_gpt_oss, reference, "--backend", "triton", "--max-shard-size", "100MB").returncode
        == 0
    )
    expected = digest(reference)
    out = tmp_path / "out"
    rng = random.Random()
    for delay in sorted(rng.uniform(0.5, 8.0) for _ in range(5)):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "moeprep",
                "convert",
                str(medium_gpt_oss),
                str(out),
                "--backend",
                "triton",
                "--max-shard-size",
                "100MB",
                "--overwrite",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # the rename happened before the kill: it must be the complete result
            assert digest(out) == expected, f"killed after {delay:.2f}s"
    result = run_cli("convert", medium_gpt_oss, out, "--backend", "triton", "--max-shard-size", "100MB", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert digest(out) == expected
    assert run_cli("verify", out).returncode == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
