"""No traceback reaches a user: an error moeprep did not foresee is one line naming what was being done and the
file involved, exit code 1, and no partial output; ``--debug`` / ``MOEPREP_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moeprep.convert
from moeprep.cli.app import app


def failing_manifest_writer(error: Exception):
    def write_manifest(*_: object, **__: object) -> None:
        raise error

    return write_manifest


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("a bug\nover two lines"), "unexpected RuntimeError while converting {src} to {dest}: a bug over"),
        (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "unexpected PermissionError while converting"),
    ],
)
def test_an_unforeseen_error_is_one_line_exit_1_and_leaves_no_output(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: str
) -> None:
    src, dest = tiny("qwen3-moe"), tmp_path / "out"
    monkeypatch.setattr(moeprep.convert, "write_manifest", failing_manifest_writer(error))  # after every shard
    monkeypatch.delenv("MOEPREP_DEBUG", raising=False)
    result = CliRunner().invoke(app, ["convert", str(src), str(dest)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(src=src, dest=dest)), lines
    assert "--debug" in lines[0] and "Traceback" not in result.output
    if isinstance(error, OSError):
        assert "(/x/y)" in lines[0]
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its hidden partial sibling


@pytest.mark.parametrize("how", [["--debug"], "env"])
def test_debug_shows_the_traceback(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: object) -> None:
    monkeypatch.setattr(moeprep.convert, "write_manifest", failing_manifest_writer(RuntimeError("a bug")))
    flags = how if isinstance(how, list) else []
    if how == "env":
        monkeypatch.setenv("MOEPREP_DEBUG", "1")
    result = CliRunner().invoke(app, [*flags, "convert", str(tiny("qwen3-moe")), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)  # re-raised for Python to print with its traceback
    assert list(tmp_path.iterdir()) == []


def test_moeprep_errors_and_usage_errors_keep_exit_code_2(tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
    usage = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "--max-shard-size", "lots"])
    assert usage.exit_code == 2 and "is not a size" in usage.output


def test_upload_takes_hf_uploads_argument_order(tmp_path: Path) -> None:
    """``moeprep upload REPO_ID FOLDER`` as ``hf upload``; the other order is a usage error showing the right one."""
    (tmp_path / "moeprep.json").write_text("{}")
    result = CliRunner().invoke(app, ["upload", str(tmp_path), "org/name"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and f"moeprep upload org/name {tmp_path}" in " ".join(result.output.split())
