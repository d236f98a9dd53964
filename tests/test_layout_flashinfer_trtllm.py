"""``flashinfer-trtllm`` layout, bitwise against vLLM 0.26's own TRT-LLM conversion of gpt-oss mxfp4 experts
(``convert_gpt_oss_weight_to_mxfp4_moe_kernel_format``) run as written on CPU with flashinfer 0.6.14's row
shuffles (``scripts/fetch_reference.sh``); the block-scale interleave, a CUDA op, is pinned by golden hashes
recorded on a GPU (``scripts/make_golden_flashinfer_trtllm.py``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from moeprep.layouts import flashinfer_trtllm
from moeprep.layouts.mxfp4_experts import Mxfp4ExpertDims
from moeprep.layouts.padding import round_up
from tests.golden_inputs import TRTLLM_CASES, gpt_oss_expert_inputs, vllm_padded_params
from tests.reference import vllm_trtllm_mxfp4_conversion

GOLDEN = Path(__file__).parent / "golden" / "flashinfer_trtllm_sm100.json"
OUTPUTS = ("w13", "w2", "w13_scale", "w2_scale", "w13_bias", "w2_bias")
PARAMS = {
    "w13": "moeprep_w13_weight",
    "w2": "moeprep_w2_weight",
    "w13_scale": "moeprep_w13_scale",
    "w2_scale": "moeprep_w2_scale",
    "w13_bias": "moeprep_w13_bias",
    "w2_bias": "moeprep_w2_bias",
}


def prepared(inputs: dict[str, torch.Tensor], hidden: int, inter: int) -> dict[str, torch.Tensor]:
    """Our layout of checkpoint tensors, by vLLM's output name."""
    experts = inputs["gate_up_proj_blocks"].shape[0]
    dims = Mxfp4ExpertDims(experts, hidden, inter, round_up(hidden, 256), round_up(inter, 256))
    by_param = {r.param: r.transform(inputs[r.source]) for r in flashinfer_trtllm.prepared_expert_tensors(dims)}
    return {name: by_param[param] for name, param in PARAMS.items()}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def assert_same(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    for name in OUTPUTS:
        assert ours[name].dtype == reference[name].dtype, name
        assert ours[name].shape == reference[name].shape, name
        assert raw(ours[name]) == raw(reference[name]), name


@pytest.mark.parametrize(
    ("experts", "hidden", "inter"),
    [(2, 2880, 2880), (3, 256, 256), (2, 192, 96), (1, 544, 320), (4, 64, 512)],
    ids=lambda v: str(v),
)
def test_equals_vllm_trtllm_conversion(monkeypatch: pytest.MonkeyPatch, experts: int, hidden: int, inter: int) -> None:
    reference = vllm_trtllm_mxfp4_conversion(monkeypatch)
    inputs = gpt_oss_expert_inputs(torch.Generator().manual_seed(hidden + inter), experts, hidden, inter)
    expected = dict(zip(OUTPUTS, reference(*vllm_padded_params(inputs, hidden, inter, 256, 256)), strict=True))
    assert_same(prepared(inputs, hidden, inter), expected)


def test_comparison_fails_without_the_pair_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = vllm_trtllm_mxfp4_conversion(monkeypatch)
    inputs = gpt_oss_expert_inputs(torch.Generator().manual_seed(7), 2, 256, 256)
    expected = dict(zip(OUTPUTS, reference(*vllm_padded_params(inputs, 256, 256, 256, 256)), strict=True))
    monkeypatch.setattr(flashinfer_trtllm, "epilogue_row_order", lambda rows, swap_pairs: _unswapped(rows))
    with pytest.raises(AssertionError, match="w13"):
        assert_same(prepared(inputs, 256, 256), expected)


def _unswapped(rows: int) -> torch.Tensor:
    i = torch.arange(rows)
    return i - i % 32 + (i % 8) * 4 + (i % 32) // 8


def test_golden_cases_are_the_declared_ones() -> None:
    cases = json.loads(GOLDEN.read_text())["cases"]
    assert [(c["seed"], c["experts"], c["hidden"], c["intermediate"]) for c in cases] == TRTLLM_CASES


@pytest.mark.parametrize("case", json.loads(GOLDEN.read_text())["cases"] if GOLDEN.exists() else [], ids=str)
def test_matches_hashes_recorded_on_gpu(case: dict) -> None:
    seed, experts, hidden, inter = case["seed"], case["experts"], case["hidden"], case["intermediate"]
    ours = prepared(gpt_oss_expert_inputs(torch.Generator().manual_seed(seed), experts, hidden, inter), hidden, inter)
    for name, expected in case["outputs"].items():
        assert list(ours[name].shape) == expected["shape"] and str(ours[name].dtype) == expected["dtype"], name
        assert hashlib.sha256(raw(ours[name])).hexdigest() == expected["sha256"], name


def test_shapes_the_shuffle_cannot_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="rows % 32"):
        flashinfer_trtllm.epilogue_row_order(48, swap_pairs=False)
    with pytest.raises(ValueError, match="interleave"):
        flashinfer_trtllm.interleave_block_scales(torch.zeros(1, 128, 6, dtype=torch.uint8))
