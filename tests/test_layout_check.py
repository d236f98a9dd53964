"""``moeprep doctor``: the machine report and the layout checks that can run here, each one line."""

from __future__ import annotations

import pytest

from moeprep.layout_check import CannotCheck, check_layout
from tests.conftest import run_cli


def test_doctor_reports_this_machine_and_proves_what_it_can(tiny, tmp_path) -> None:
    pytest.importorskip("vllm")
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vLLM: ") and lines[1].startswith("serving target: ")
    assert "vLLM hooks the plugin uses: all present" in lines
    assert any(line.startswith("cpu any: ") for line in lines)  # checked, or why not


def test_doctor_on_a_folder_says_its_range_and_serve_command(tiny, tmp_path) -> None:
    pytest.importorskip("vllm")
    dest = tmp_path / "dequant"
    assert run_cli("convert", tiny("gpt-oss"), dest, "--backend", "dequant").returncode == 0
    result = run_cli("doctor", dest)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "folder: backend dequant, recipe dequant-any, verified for vLLM 0.32.0" in lines
    assert lines[-2:] == ["serve with:", f"vllm serve {dest}"]


def test_backends_without_a_vllm_transform_are_not_checked() -> None:
    for backend in ("none", "dequant", "flashinfer-trtllm"):
        with pytest.raises(CannotCheck):
            check_layout(backend, "sm90")
