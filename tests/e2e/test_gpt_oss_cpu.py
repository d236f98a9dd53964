"""gpt-oss (mxfp4 experts) served by vLLM CPU through ``--backend dequant``, checked against a float32
reference: transformers' gpt-oss on the original checkpoint (its own mxfp4 dequantization).

Tolerance: vLLM computes in bf16, so its log-probabilities are compared with the float32 reference on
the same tokens (teacher forcing): mean |Δ| ≤ 0.035 nats and no worse than 1.5× the error of the same
reference run in bf16; greedy tokens agree wherever the reference's top-2 margin exceeds 0.25 nats, and
disagree no more often than the bf16 reference's own. A
reference with gate/up rows swapped, or with the experts' down-projection bias removed, must fail the
same bound (the check sees MoE mistakes).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import rewrite_manifest, run_cli
from tests.e2e.vllm_server import PROMPTS, complete, run_until_exit, vllm_server

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.vllm

MEAN_TOLERANCE = 0.035  # measured: 0.021 for vLLM, 0.023 for the bf16 reference
MARGIN = 0.25  # the bf16 reference itself flips tokens with margins up to ~0.15
TOKENS = 32


def completion(url: str, model: Path, prompt: str) -> dict:
    return complete(url, model, prompt, TOKENS, logprobs=1)


def reference_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """[generated, vocab] log-probabilities of ``model`` for each generated position (teacher forcing)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    dest = tmp_path_factory.mktemp("gpt-oss-cpu") / "dequant"
    result = run_cli("convert", tiny("gpt-oss"), dest, "--backend", "dequant")
    assert result.returncode == 0, result.stderr
    log = dest.parent / "serve.log"
    with vllm_server(dest, log) as url:
        choices = [completion(url, dest, prompt) for prompt in PROMPTS]
    assert "moeprep: mxfp4 experts run through moeprep's per-expert dequantization" in log.read_text()
    return choices


def chosen_logprobs(model, choice: dict) -> torch.Tensor:
    """``model``'s log-probabilities of the tokens vLLM generated."""
    reference = reference_logprobs(model, choice["prompt_token_ids"], choice["token_ids"])
    return reference[torch.arange(TOKENS), torch.tensor(choice["token_ids"])]


def vllm_logprobs(choice: dict) -> torch.Tensor:
    return torch.tensor(choice["logprobs"]["token_logprobs"])


def test_served_gpt_oss_matches_the_float_reference(tiny, served: list[dict]) -> None:
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(tiny("gpt-oss")).float().eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert all(len(c["token_ids"]) == TOKENS and len(set(c["token_ids"])) > 4 for c in served)

    expected = [chosen_logprobs(fp32, c) for c in served]
    delta = torch.cat([(e - vllm_logprobs(c)).abs() for e, c in zip(expected, served, strict=True)])
    bf16_noise = torch.cat([(e - chosen_logprobs(bf16, c)).abs() for e, c in zip(expected, served, strict=True)])
    assert delta.mean() <= MEAN_TOLERANCE, f"mean |Δ logprob| {delta.mean():.4f}"
    assert delta.mean() <= 1.5 * bf16_noise.mean(), (delta.mean(), bf16_noise.mean())
    flips, bf16_flips = 0, 0
    for choice in served:
        reference = reference_logprobs(fp32, choice["prompt_token_ids"], choice["token_ids"])
        top2 = reference.topk(2, -1).values
        confident = (top2[:, 0] - top2[:, 1]) > MARGIN
        tokens = torch.tensor(choice["token_ids"])
        assert torch.equal(reference.argmax(-1)[confident], tokens[confident])
        flips += int((reference.argmax(-1) != tokens).sum())
        bf16_argmax = reference_logprobs(bf16, choice["prompt_token_ids"], choice["token_ids"]).argmax(-1)
        bf16_flips += int((reference.argmax(-1) != bf16_argmax).sum())
    assert flips <= bf16_flips, (flips, bf16_flips)

    for mistake in (swap_gate_and_up, drop_down_bias):
        broken = copy.deepcopy(fp32)
        for layer in broken.model.layers:
            mistake(layer.mlp.experts)
        broken_delta = torch.cat([(chosen_logprobs(broken, c) - vllm_logprobs(c)).abs() for c in served])
        assert broken_delta.mean() > MEAN_TOLERANCE, f"{mistake.__name__} passes ({broken_delta.mean():.4f})"


def swap_gate_and_up(experts) -> None:
    w = experts.gate_up_proj.data
    w.copy_(torch.stack((w[..., 1::2], w[..., 0::2]), -1).reshape(w.shape))


def drop_down_bias(experts) -> None:
    experts.down_proj_bias.data.zero_()


def test_triton_folder_is_refused_on_vllm_cpu(tiny, tmp_path: Path) -> None:
    dest = tmp_path / "triton"
    assert run_cli("convert", tiny("gpt-oss"), dest, "--backend", "triton").returncode == 0
    code, output = run_until_exit(dest, tmp_path / "triton.log")
    assert code != 0
    assert "triton (matmul_ogs) layouts, which need a CUDA GPU" in output


def test_folder_for_other_vllm_releases_is_refused(tiny, tmp_path: Path) -> None:
    dest = tmp_path / "dequant"
    assert run_cli("convert", tiny("gpt-oss"), dest, "--backend", "dequant").returncode == 0
    rewrite_manifest(dest, lambda manifest: manifest["target"].update(vllm_ranges=[["0.1.0", "0.1.5"]]))
    code, output = run_until_exit(dest, tmp_path / "dequant.log")
    assert code != 0
    assert "layouts are verified for vLLM 0.1.0-0.1.5 but vLLM 0.32.0 is running" in output
