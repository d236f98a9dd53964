"""Marlin mxfp4 layout, bitwise against vLLM's ``prepare_moe_mxfp4_layer_for_marlin`` (a CUDA op), recorded by
scripts/make_golden_marlin.py with vLLM 0.26.0 on an H100 and again, with the same hashes, with vLLM 0.34.0 on an
H200: raw tensors for a small case, sha256 for gpt-oss-sized ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprep.layouts.marlin import permute_marlin_bias, permute_marlin_scales, repack_marlin_weight
from tests.golden_inputs import MARLIN_CASES, marlin_inputs

GOLDEN = Path(__file__).parent / "golden" / "marlin"
RECORDED = json.loads((GOLDEN / "marlin_mxfp4_golden.json").read_text())
CASES = RECORDED["cases"]


def test_layout_is_claimed_only_for_the_vllm_releases_whose_op_was_recorded() -> None:
    from moeprep.layouts import marlin

    recorded = " ".join([RECORDED["reference"], *RECORDED["also_recorded"]])
    for low, high in marlin.VLLM_RANGES:
        assert low == high and f"vllm {low} " in recorded  # a CUDA op: only the releases it ran on


def marlin(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "w13": repack_marlin_weight(inputs["w13"]),
        "w2": repack_marlin_weight(inputs["w2"]),
        "w13_scale": permute_marlin_scales(inputs["w13_scale"]),
        "w2_scale": permute_marlin_scales(inputs["w2_scale"]),
        "w13_bias": permute_marlin_bias(inputs["w13_bias"]),
        "w2_bias": permute_marlin_bias(inputs["w2_bias"]),
    }


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_golden_cases_are_the_declared_ones() -> None:
    assert [(c["seed"], c["experts"], c["intermediate"], c["hidden"]) for c in CASES] == MARLIN_CASES


def test_small_case_equals_recorded_tensors() -> None:
    recorded = load_file(GOLDEN / "marlin_mxfp4_11.safetensors")
    inputs = {k.removeprefix("in."): v for k, v in recorded.items() if k.startswith("in.")}
    assert all(torch.equal(raw(inputs[k]), raw(v)) for k, v in marlin_inputs(*MARLIN_CASES[0]).items())
    ours = marlin(inputs)
    for name, expected in ((k.removeprefix("out."), v) for k, v in recorded.items() if k.startswith("out.")):
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        assert torch.equal(raw(ours[name]), raw(expected)), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"E{c['experts']}-I{c['intermediate']}-H{c['hidden']}")
def test_matches_recorded_hashes(case: dict) -> None:
    ours = marlin(marlin_inputs(case["seed"], case["experts"], case["intermediate"], case["hidden"]))
    for name, expected in case["outputs"].items():
        assert list(ours[name].shape) == expected["shape"] and str(ours[name].dtype) == expected["dtype"], name
        assert hashlib.sha256(raw(ours[name]).numpy().tobytes()).hexdigest() == expected["sha256"], name


def test_shapes_that_marlin_cannot_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="N % 64"):
        repack_marlin_weight(torch.ones(1, 96, 64, dtype=torch.uint8))
