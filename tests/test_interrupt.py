"""A conversion killed (SIGKILL) while it writes leaves no output folder or a complete one, and running it again
gives output byte-identical to an uninterrupted run. Each kill lands at a seeded share of the output's bytes, seen
on disk in the partial folder, so every kill is known to hit the writer mid-conversion."""

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
from tests.conftest import fresh_seed, run_cli

ARGS = ("--backend", "triton", "--max-shard-size", "100MB")


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def bytes_on_disk(folder: Path) -> int:
    try:
        return sum(p.stat().st_size for p in folder.iterdir())
    except FileNotFoundError:  # not created yet, or renamed into place meanwhile
        return 0


@pytest.fixture(scope="module")
def medium_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One layer with gpt-oss-20b expert dims (~0.4 GB): long enough to be killed mid-write."""
    return build_fixture("gpt-oss", tmp_path_factory.mktemp("medium") / "src", preset="20b", num_layers=1)


def kill_when_written(src: Path, out: Path, threshold: int) -> int:
    """Start ``convert src out``, SIGKILL it once its partial folder holds ``threshold`` bytes; the bytes seen."""
    partial = out.parent / f".{out.name}.moeprep-partial"
    command = [sys.executable, "-m", "moeprep", "convert", str(src), str(out), *ARGS, "--overwrite"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while (seen := bytes_on_disk(partial)) < threshold and proc.poll() is None:
            time.sleep(0.002)
        assert proc.poll() is None, f"the conversion ended (code {proc.returncode}) before {threshold} bytes were seen"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return seen


def test_sigkill_mid_write_never_leaves_a_complete_looking_partial(medium_gpt_oss: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert run_cli("convert", medium_gpt_oss, reference, *ARGS).returncode == 0
    expected = digest(reference)
    total = bytes_on_disk(reference)
    rng = random.Random(fresh_seed())
    out = tmp_path / "out"
    for share in sorted(rng.uniform(0.02, 0.9) for _ in range(4)):
        seen = kill_when_written(medium_gpt_oss, out, int(share * total))
        assert 0 < seen < total
        assert not out.exists(), f"killed at {seen} of {total} bytes, the output folder exists"
    result = run_cli("convert", medium_gpt_oss, out, *ARGS, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert digest(out) == expected
    assert run_cli("verify", out).returncode == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
