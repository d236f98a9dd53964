"""On the H100 with vLLM 0.26: folders converted with ``--fuse-shared-experts`` (one Triton MoE kernel for
routed experts and shared-expert slots) score the original's greedy continuations like the original does
(teacher-forced log-probabilities, bf16 tolerance), for DeepSeek-V3 (grouped sigmoid routing with
correction bias, routed_scaling_factor 2.5; bf16 and DeepSeek's own block-fp8 format, slots split with their
block scales) and GLM-4-MoE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeprep.convert import convert, load_plan
from moeprep.fixtures import build_fixture
from tests.gpu.test_mxfp4_gpu import OUT, generate

TOLERANCE = 0.02  # mean |Δ logprob| in nats; vLLM CPU measures ~0.005 for the same comparison
TOKENS = ["--max-tokens", "64"]


def run(model: Path, name: str, *extra: str) -> dict:
    generate(model, name, *TOKENS, *extra)
    return json.loads((OUT / f"{name}.json").read_text())


@pytest.mark.parametrize(
    ("family", "quantization"), [("deepseek-v3", "none"), ("glm4-moe", "none"), ("deepseek-v3", "fp8-block")]
)
def test_fused_shared_experts_score_like_the_original(tmp_path: Path, family: str, quantization: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    src = build_fixture(family, tmp_path / "src", quantization=quantization)
    source, plan = load_plan(str(src), "none", fuse_shared_replicas=1)
    convert(source, plan, tmp_path / "fused")
    name = f"fused-{family}" + ("" if quantization == "none" else f"-{quantization}")
    original = run(src, f"{name}-original")
    sequences = tmp_path / "sequences.json"
    sequences.write_text(json.dumps(original["sequences"]))
    fused = run(tmp_path / "fused", f"{name}-fused", "--score", str(sequences))
    log = (OUT / f"{name}-fused.log").read_text()
    assert "Resolved architecture: MoeprepFused" in log

    delta = (torch.tensor(sum(fused["scores"], [])) - torch.tensor(sum(original["scores"], []))).abs()
    same = [common_prefix(a, b) for a, b in zip(original["tokens"], fused["tokens"], strict=True)]
    summary = {"mean_abs_dlogprob": delta.mean().item(), "max_abs_dlogprob": delta.max().item(), "same_prefix": same}
    (OUT / f"{name}-summary.json").write_text(json.dumps(summary))
    assert all(len(set(t)) > 4 for t in original["tokens"])
    assert delta.mean() <= TOLERANCE, summary


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
