"""DeepSeek-V3 and GLM-4.5 as released carry a multi-token-prediction layer after the decoder
(``num_nextn_predict_layers: 1``). Prepared with and without fused shared experts, vLLM CPU serves the main
model from both folders alike (float32: the same greedy tokens, log-probabilities within the fused tests'
tolerance); the MTP layer stays in both as stored (tests/test_checkpoint_variants.py). A GLM-4.5 model saved by
transformers counts an MTP layer it does not store: its prepared folder serves the original's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeprep.fixtures import build_fixture
from moeprep.fixtures.tokenizer import SAMPLE_PROMPTS
from tests.conftest import deepseek_style_by_transformers, fresh_seed, run_cli
from tests.e2e.test_fused_shared_cpu import FP32_TOLERANCE, TOKENS
from tests.e2e.vllm_server import complete, sequence_logprobs, vllm_server

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


def serve(model: Path, log: Path, sequences: list[list[int]] | None = None) -> dict:
    with vllm_server(model, log, dtype="float32") as url:
        choices = [complete(url, model, prompt, TOKENS) for prompt in SAMPLE_PROMPTS]
        sequences = sequences or [c["prompt_token_ids"] + c["token_ids"] for c in choices]
        scores = [sequence_logprobs(url, model, ids) for ids in sequences]
    greedy = [c["token_ids"] for c in choices]
    return {"greedy": greedy, "sequences": sequences, "logprobs": torch.tensor(sum(scores, []))}


@pytest.mark.parametrize("family", ["deepseek-v3", "glm4-moe"])
def test_prepared_folders_with_an_mtp_layer_serve_the_main_model_alike(tmp_path: Path, family: str) -> None:
    src = build_fixture(family, tmp_path / "src", config_overrides={"num_nextn_predict_layers": 1})
    for name, args in (("plain", ()), ("fused", ("--fuse-shared-experts",))):
        result = run_cli("convert", src, tmp_path / name, *args)
        assert result.returncode == 0, result.stderr
    plain = serve(tmp_path / "plain", tmp_path / "plain.log")
    fused = serve(tmp_path / "fused", tmp_path / "fused.log", plain["sequences"])
    assert all(len(set(tokens)) > 4 for tokens in plain["greedy"]), "degenerate generations cannot tell apart"
    assert fused["greedy"] == plain["greedy"]
    delta = (fused["logprobs"] - plain["logprobs"]).abs()
    assert delta.mean() <= FP32_TOLERANCE, f"mean |Δ logprob| {delta.mean():.2e}"


def test_a_checkpoint_without_its_counted_mtp_layer_serves_the_originals_tokens(tmp_path: Path) -> None:
    src = deepseek_style_by_transformers("glm4-moe", tmp_path / "src", fresh_seed())
    result = run_cli("convert", src, tmp_path / "prepared")
    assert result.returncode == 0, result.stderr
    original = serve(src, tmp_path / "original.log")
    prepared = serve(tmp_path / "prepared", tmp_path / "prepared.log", original["sequences"])
    assert all(len(set(tokens)) > 4 for tokens in original["greedy"]), "degenerate generations cannot tell apart"
    assert prepared["greedy"] == original["greedy"]
    assert (prepared["logprobs"] - original["logprobs"]).abs().max() == 0  # the same bytes, the same engine
