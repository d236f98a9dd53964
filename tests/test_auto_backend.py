"""``convert`` with no flags: ``--backend auto`` picks the layout vLLM selects on the serving GPU or CPU, says
which and why, and prints the serve command; without a known target it asks for one in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprep import auto_backend
from moeprep.auto_backend import ServingTarget, choose_mxfp4, serving_target
from moeprep.errors import UnsupportedModelError
from tests.conftest import run_cli


def target_of(folder: Path) -> dict:
    return json.loads((folder / "moeprep.json").read_text())["target"]


@pytest.mark.parametrize(
    ("gpu", "extra", "backend", "recipe"),
    [
        ("h100", [], "triton", "triton-sm90"),
        ("h200", [], "triton", "triton-sm90"),
        ("a100", [], "marlin", "marlin-any"),
        ("l40s", [], "marlin", "marlin-any"),
        ("b200", [], "none", "none-sm100"),  # no FlashInfer TRT-LLM recipe for the newest vLLM: padding only
        ("b200", ["--vllm-version", "0.26.0"], "flashinfer-trtllm", "flashinfer-trtllm-sm100"),
    ],
)
def test_gpt_oss_for_a_named_gpu_gets_the_layout_vllm_selects_there(
    tiny, tmp_path: Path, gpu: str, extra: list[str], backend: str, recipe: str
) -> None:
    result = run_cli("convert", tiny("gpt-oss"), tmp_path / "out", "--target-gpu", gpu, *extra)
    assert result.returncode == 0, result.stderr
    assert target_of(tmp_path / "out")["recipe"] == recipe
    assert result.stdout.splitlines()[0].startswith(f"backend {backend}: vLLM runs mxfp4 MoE")


def test_default_conversion_targets_this_machine(tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("gpt-oss"), tmp_path / "out")
    expected = choose_mxfp4(serving_target(None, None), trtllm_supported=False)
    assert result.returncode == 0, result.stderr
    assert target_of(tmp_path / "out")["backend"] == expected.backend
    assert f"backend {expected.backend}: {expected.reason}" in result.stdout


def test_families_without_mxfp4_experts_pass_through_on_any_target(tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("glm4-moe"), tmp_path / "out", "--target-gpu", "b200")
    assert result.returncode == 0, result.stderr
    assert target_of(tmp_path / "out")["backend"] == "none"
    lines = result.stdout.splitlines()
    assert "nothing was re-laid out" in result.stdout and "--fuse-shared-experts" in result.stdout
    assert lines[-1] == f"vllm serve {tmp_path / 'out'}"


def test_unknown_gpu_and_unknown_machine_are_one_line(monkeypatch: pytest.MonkeyPatch, tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("gpt-oss"), tmp_path / "out", "--target-gpu", "x9000")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "h100" in result.stderr and not (tmp_path / "out").exists()
    assert "--target-gpu x9000 is not known" in result.stderr  # the library names options, the CLI adds flags
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(auto_backend, "installed_vllm", lambda: None)
    with pytest.raises(UnsupportedModelError, match="pass `target_gpu` .* or `arch`") as refused:
        serving_target(None, None)
    assert "--" not in str(refused.value)


def test_library_messages_name_options_and_the_cli_writes_them_as_flags() -> None:
    from moeprep.cli.app import as_flags
    from moeprep.errors import option

    message = f"{option('tp_size', 3)} with {option('fuse_shared_replicas', 2)}; pass {option('overwrite', True)}"
    assert message == "`tp_size=3` with `fuse_shared_replicas=2`; pass `overwrite=True`"
    assert as_flags(message) == "--tp 3 with --fuse-shared-experts=2; pass --overwrite"
    assert as_flags(f"use {option('backend', 'none')} or {option('arch')}; `unknown`") == (
        "use --backend none or --arch; `unknown`"
    )


def test_choices_per_target() -> None:
    cpu = ServingTarget("cpu", None, False, "a CPU")
    assert choose_mxfp4(cpu, False).backend == "dequant"
    assert choose_mxfp4(ServingTarget("cpu", None, True, "an AMX CPU"), False).backend == "cpu"
    assert choose_mxfp4(ServingTarget("cuda", "sm103", False, "a B300"), True).backend == "flashinfer-trtllm"
    assert choose_mxfp4(ServingTarget("cuda", "sm90", False, "an H100"), True).backend == "triton"
    assert choose_mxfp4(ServingTarget("cuda", "sm86", False, "an A10"), True).backend == "marlin"
    assert serving_target("sm90", None).arch == "sm90" and serving_target(None, "GB200").arch == "sm100"
