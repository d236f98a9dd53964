"""Fused shared experts served by vLLM CPU: the same model as the original checkpoint.

For GLM-4-MoE, Qwen2-MoE (sigmoid-gated shared expert, two slots, two replicas), DeepSeek-V3 and Llama 4
(router weight on the routed expert's input, slots on their own token rows, two replicas): in float32,
greedy tokens equal the original's for 64 tokens on every prompt and teacher-forced log-probabilities
agree to FP32_TOLERANCE; in bf16 (where the fused kernel sums in another order) the log-probabilities
agree to BF16_TOLERANCE (the first three). The comparison sees the known mistakes: a contract that applies
``routed_scaling_factor`` twice, or not at all, fails it. With ``MOEPREP_SHARED_SLOT_TOKENS`` leaving steps to
the dense shared expert (prefill only, or every step), DeepSeek-V3 and GLM-4-MoE still serve the original's tokens.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from moeprep.fixtures.tokenizer import SAMPLE_PROMPTS
from moeprep.runtime.slot_steps import SLOT_TOKENS_ENV
from tests.conftest import rewrite_manifest, run_cli
from tests.e2e.vllm_server import complete, sequence_logprobs, vllm_server

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

TOKENS = 64
REPLICAS = {"glm4-moe": 1, "qwen2-moe": 2, "deepseek-v3": 1, "llama4": 2}
BF16_FAMILIES = ["glm4-moe", "qwen2-moe", "deepseek-v3"]
FP32_TOLERANCE = 2e-3  # mean |Δ logprob|, nats
BF16_TOLERANCE = 0.02  # measured ~0.005
# Served variants that leave steps to the dense shared expert: the slots only at 1-token (decode) steps, or never.
SLOT_TOKENS = {"dense-prefill": "1", "dense-every-step": "none"}


def run(model: Path, log: Path, dtype: str, sequences: list[list[int]] | None = None, env: dict | None = None) -> dict:
    """Greedy tokens for every prompt, and log-probabilities of ``sequences`` (default: prompt + greedy)."""
    with patch.dict(os.environ, env or {}), vllm_server(model, log, dtype=dtype) as url:
        choices = [complete(url, model, prompt, TOKENS) for prompt in SAMPLE_PROMPTS]
        greedy = [choice["token_ids"] for choice in choices]
        sequences = sequences or [c["prompt_token_ids"] + c["token_ids"] for c in choices]
        scores = [sequence_logprobs(url, model, ids) for ids in sequences]
    return {"greedy": greedy, "sequences": sequences, "logprobs": torch.tensor(sum(scores, []))}


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fused-shared")
    cache: dict[tuple[str, str, str], dict] = {}

    def get(family: str, variant: str, dtype: str) -> dict:
        key = (family, variant, dtype)
        if key not in cache:
            model = tiny(family) if variant == "original" else fused_folder(tiny(family), root, family, variant)
            reference = None if variant == "original" else get(family, "original", dtype)["sequences"]
            env = {SLOT_TOKENS_ENV: SLOT_TOKENS[variant]} if variant in SLOT_TOKENS else None
            cache[key] = run(model, root / f"{family}-{variant}-{dtype}.log", dtype, reference, env)
        return cache[key]

    return get


def fused_folder(source: Path, root: Path, family: str, variant: str) -> Path:
    fused = root / f"{family}-fused"
    if not fused.exists():
        result = run_cli("convert", source, fused, f"--fuse-shared-experts={REPLICAS[family]}")
        assert result.returncode == 0, result.stderr
    if variant == "fused" or variant in SLOT_TOKENS:
        return fused
    mutant = shutil.copytree(fused, root / f"{family}-{variant}")
    rewrite_manifest(mutant, lambda m: scale_mistake(m["routing"]["fused_shared_experts"], variant))
    return mutant


def scale_mistake(contract: dict, variant: str) -> None:
    factor = contract["routed_scaling_factor"]
    contract["routed_scaling_factor"] = {"scaled-twice": factor * factor, "not-scaled": 1.0}[variant]


@pytest.mark.parametrize("family", list(REPLICAS))
def test_fused_float32_generates_the_original_tokens(served, family: str) -> None:
    original, fused = served(family, "original", "float32"), served(family, "fused", "float32")
    assert fused["greedy"] == original["greedy"]
    assert all(len(set(tokens)) > 4 for tokens in original["greedy"]), "degenerate generations cannot tell apart"
    delta = (fused["logprobs"] - original["logprobs"]).abs()
    assert delta.mean() <= FP32_TOLERANCE, f"mean |Δ logprob| {delta.mean():.2e}"


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_fused_bf16_scores_like_the_original(served, family: str) -> None:
    original, fused = served(family, "original", "bfloat16"), served(family, "fused", "bfloat16")
    delta = (fused["logprobs"] - original["logprobs"]).abs()
    assert delta.mean() <= BF16_TOLERANCE, f"mean |Δ logprob| {delta.mean():.4f}"


@pytest.mark.parametrize("variant", ["scaled-twice", "not-scaled"])
def test_routed_scaling_mistakes_fail_the_comparison(served, variant: str) -> None:
    original, broken = served("deepseek-v3", "original", "float32"), served("deepseek-v3", variant, "float32")
    delta = (broken["logprobs"] - original["logprobs"]).abs()
    assert delta.mean() > 10 * BF16_TOLERANCE, f"{variant}: mean |Δ logprob| {delta.mean():.4f}"
    assert broken["greedy"] != original["greedy"]


@pytest.mark.parametrize(
    ("family", "variant"),
    [("deepseek-v3", "dense-prefill"), ("deepseek-v3", "dense-every-step"), ("glm4-moe", "dense-prefill")],
)
def test_steps_left_to_the_dense_shared_expert_serve_the_original_tokens(served, family: str, variant: str) -> None:
    """The slot's weights loaded into the family's dense shared MLP, run at the steps the setting leaves to it
    (prefill, where the teacher-forced log-probabilities come from, or every step) with the slot columns at
    weight 0: the original's greedy tokens and log-probabilities, as with the slots."""
    original, dense = served(family, "original", "float32"), served(family, variant, "float32")
    assert dense["greedy"] == original["greedy"]
    delta = (dense["logprobs"] - original["logprobs"]).abs()
    assert delta.mean() <= FP32_TOLERANCE, f"mean |Δ logprob| {delta.mean():.2e}"
