"""On the H100 with vLLM 0.26: folders converted with ``--fuse-shared-experts`` (one Triton MoE kernel for
routed experts and shared-expert slots) score the original's greedy continuations like the original does
(teacher-forced log-probabilities), for DeepSeek-V3 (grouped sigmoid routing with correction bias,
routed_scaling_factor 2.5; bf16 and DeepSeek's own block-fp8 format, slots split with their block scales),
GLM-4-MoE and Llama 4 (router weight on the routed expert's input; slots on their own token rows).

Tolerances (mean |Δ logprob| in nats): bf16 0.02 (vLLM CPU measures ~0.005 for the same comparison);
block-fp8 0.05: vLLM runs it w8a8, quantizing activations to e4m3 per 128-group, and the slot's
activations are quantized inside the MoE kernel rather than by the dense shared-expert linear. For fp8 the
test also serves a fused folder whose shared expert's down-projection scales were doubled before fusing
(what a slot loaded with the wrong scales would do) and requires it to score at least twice the tolerance
away, so the tolerance is tight enough to see a scale mistake. With ``MOEPREP_SHARED_SLOT_TOKENS`` leaving
steps to vLLM's dense shared expert (on its auxiliary CUDA stream), DeepSeek-V3 block fp8 and GLM-4-MoE score the
same way: every step dense (``none``: the scored prefill runs the original's top-k and the dense shared MLP), or
steps of 5 tokens and more on the slots (``5-``: the scored prefill runs the slots while the dense shared MLP is
built and must add nothing, and the 4-sequence decode steps run dense), or unset (``default``: on CUDA vLLM 0.34
these unmeasured shapes get decode steps dense, prefill-sized steps on the slots, and the engine's log says so).
The fused tests above set ``all``, every step on the slots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprep.convert import convert, load_plan
from moeprep.fixtures import build_fixture
from moeprep.plan import PlanOptions
from moeprep.runtime.slot_steps import DENSE_DECODE, SLOT_TOKENS_ENV
from moeprep.schema.vllm_versions import version_key
from tests.gpu.test_mxfp4_gpu import OUT, generate

TOLERANCE = {"none": 0.02, "fp8-block": 0.05}
TOKENS = ["--max-tokens", "64"]


def run(model: Path, name: str, *extra: str) -> dict:
    generate(model, name, *TOKENS, *extra)
    return json.loads((OUT / f"{name}.json").read_text())


def fused(src: Path, dest: Path) -> Path:
    source, plan = load_plan(str(src), "none", options=PlanOptions(fuse_shared_replicas=1))
    convert(source, plan, dest)
    return dest


def with_shared_down_scales_doubled(src: Path, dest: Path) -> Path:
    """A copy of ``src`` whose shared experts' down_proj weight_scale_inv are twice the original."""
    shutil.copytree(src, dest)
    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        names = [n for n in tensors if n.endswith("shared_experts.down_proj.weight_scale_inv")]
        if names:
            save_file({**tensors, **{n: tensors[n] * 2 for n in names}}, str(shard), metadata={"format": "pt"})
    return dest


def mean_delta(scored: dict, original: dict) -> torch.Tensor:
    return (torch.tensor(sum(scored["scores"], [])) - torch.tensor(sum(original["scores"], []))).abs()


@pytest.mark.parametrize(
    ("family", "quantization"),
    [("deepseek-v3", "none"), ("glm4-moe", "none"), ("deepseek-v3", "fp8-block"), ("llama4", "none")],
)
def test_fused_shared_experts_score_like_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, quantization: str
) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(SLOT_TOKENS_ENV, "all")  # every step on the slots (unset, decode steps may run dense)
    src = build_fixture(family, tmp_path / "src", quantization=quantization)
    name = f"fused-{family}" + ("" if quantization == "none" else f"-{quantization}")
    original = run(src, f"{name}-original")
    sequences = tmp_path / "sequences.json"
    sequences.write_text(json.dumps(original["sequences"]))
    scored = run(fused(src, tmp_path / "fused"), f"{name}-fused", "--score", str(sequences))
    log = (OUT / f"{name}-fused.log").read_text()
    assert "Resolved architecture: MoeprepFused" in log

    delta = mean_delta(scored, original)
    same = [common_prefix(a, b) for a, b in zip(original["tokens"], scored["tokens"], strict=True)]
    summary = {"mean_abs_dlogprob": delta.mean().item(), "max_abs_dlogprob": delta.max().item(), "same_prefix": same}
    if quantization == "fp8-block":
        wrong = fused(with_shared_down_scales_doubled(src, tmp_path / "wrong-src"), tmp_path / "wrong")
        wrong_scored = run(wrong, f"{name}-wrong-scales", "--score", str(sequences))
        summary["wrong_scales_mean_abs_dlogprob"] = mean_delta(wrong_scored, original).mean().item()
    (OUT / f"{name}-summary.json").write_text(json.dumps(summary))
    assert all(len(set(t)) > 4 for t in original["tokens"])
    assert delta.mean() <= TOLERANCE[quantization], summary
    if quantization == "fp8-block":
        assert summary["wrong_scales_mean_abs_dlogprob"] >= 2 * TOLERANCE[quantization], summary


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@pytest.mark.parametrize(("family", "quantization"), [("deepseek-v3", "fp8-block"), ("glm4-moe", "none")])
@pytest.mark.parametrize("slot_tokens", ["none", "5-", "default"])
def test_steps_left_to_the_dense_shared_expert_score_like_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, quantization: str, slot_tokens: str
) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    src = build_fixture(family, tmp_path / "src", quantization=quantization)
    name = f"dense-steps-{slot_tokens}-{family}-{quantization}"
    original = run(src, f"{name}-original")
    sequences = tmp_path / "sequences.json"
    sequences.write_text(json.dumps(original["sequences"]))
    if slot_tokens == "default":  # unset: these tiny shapes are not measured, so decode steps run dense
        monkeypatch.delenv(SLOT_TOKENS_ENV, raising=False)
    else:
        monkeypatch.setenv(SLOT_TOKENS_ENV, slot_tokens)  # read by the engine process generate.py starts
    scored = run(fused(src, tmp_path / "fused"), f"{name}-fused", "--score", str(sequences))
    if slot_tokens == "default":  # vLLM 0.26 keeps every step on the slots
        import vllm

        setting = DENSE_DECODE if version_key(vllm.__version__) >= (0, 34, 0) else "all"
        assert f"shared-expert slots at step sizes {setting} (" in (OUT / f"{name}-fused.log").read_text()
    delta = mean_delta(scored, original)
    same = [common_prefix(a, b) for a, b in zip(original["tokens"], scored["tokens"], strict=True)]
    summary = {"mean_abs_dlogprob": delta.mean().item(), "max_abs_dlogprob": delta.max().item(), "same_prefix": same}
    (OUT / f"{name}-summary.json").write_text(json.dumps(summary))
    assert all(len(set(t)) > 4 for t in original["tokens"])
    assert delta.mean() <= TOLERANCE[quantization], summary
