"""gpt-oss (mxfp4 experts) served by vLLM CPU through ``--backend dequant``, checked against a float32
reference: transformers' gpt-oss on the original checkpoint (its own mxfp4 dequantization). The converted source
stores its attention sinks and expert biases in float32, as other tools save them (the same values).

vLLM scores the float32 reference's own greedy continuations (teacher forcing; the sequences do not depend on the
CPU's kernels). Served in float32, its mean |Δ log-probability| is at most FP32_TOLERANCE, and references with
gate/up rows swapped or with the experts' down-projection bias removed are ten times farther (the check sees MoE
mistakes). Served in bf16, it is within BF16_FACTOR of the same reference run in bf16 (vLLM CPU's bf16 kernels
differ per instruction set: measured 0.9x on an AVX512-BF16 CPU, 1.4x on an AVX2 one), and its own greedy tokens
agree with the reference wherever the reference's top-2 margin exceeds 0.25 nats, and disagree no more often than
the bf16 reference's own. An unquantized (bf16) gpt-oss as transformers saves it converts as stored and serves the
original's float32 greedy tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    fresh_seed,
    rewrite_manifest,
    run_cli,
    unquantized_gpt_oss_by_transformers,
    with_tensors_cast,
)
from tests.e2e.vllm_server import PROMPTS, complete, run_until_exit, sequence_logprobs, vllm_server

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.vllm

FP32_TOLERANCE = 1e-4  # mean |Δ logprob| in nats; measured 9e-7 (dropping the down bias: 0.04)
BF16_FACTOR = 2.0  # vLLM's bf16 error may be this much above transformers' own bf16 error
MARGIN = 0.25  # the bf16 reference itself flips tokens with margins up to ~0.15
TOKENS = 32
FLOAT32_SAVED = (".self_attn.sinks", ".mlp.experts.gate_up_proj_bias", ".mlp.experts.down_proj_bias")


def reference_logprobs(model, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """[generated, vocab] log-probabilities of ``model`` for each generated position (teacher forcing)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]


def greedy(model, prompt_ids: list[int]) -> list[int]:
    """``model``'s greedy continuation of ``prompt_ids``: TOKENS tokens."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def fp32(tiny):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny("gpt-oss")).float().eval()


@pytest.fixture(scope="module")
def served(tiny, fp32, tmp_path_factory: pytest.TempPathFactory):
    """``served(dtype)``: vLLM's greedy completions and its log-probabilities of the float32 reference's greedy
    continuations, served in ``dtype`` (each dtype's server started once)."""
    root = tmp_path_factory.mktemp("gpt-oss-cpu")
    # as other tools save gpt-oss: float32 attention sinks and expert biases (the same values, exactly)
    src = with_tensors_cast(tiny("gpt-oss"), root / "f32-src", FLOAT32_SAVED, torch.float32)
    dest = root / "dequant"
    result = run_cli("convert", src, dest, "--backend", "dequant")
    assert result.returncode == 0, result.stderr
    cache: dict[str, dict] = {}

    def get(dtype: str) -> dict:
        if dtype not in cache:
            log = dest.parent / f"serve-{dtype}.log"
            with vllm_server(dest, log, dtype=dtype) as url:
                choices = [complete(url, dest, prompt, TOKENS, logprobs=1) for prompt in PROMPTS]
                continuations = [(c["prompt_token_ids"], greedy(fp32, c["prompt_token_ids"])) for c in choices]
                scores = [sequence_logprobs(url, dest, p + g)[-TOKENS:] for p, g in continuations]
            assert "moeprep: mxfp4 experts run through moeprep's per-expert dequantization" in log.read_text()
            cache[dtype] = {"choices": choices, "continuations": continuations, "scores": torch.tensor(sum(scores, []))}
        return cache[dtype]

    return get


def scored(model, continuations: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """``model``'s log-probabilities of each continuation's tokens."""
    out = [reference_logprobs(model, p, g)[torch.arange(TOKENS), torch.tensor(g)] for p, g in continuations]
    return torch.cat(out)


def test_served_in_float32_matches_the_float_reference_and_sees_moe_mistakes(fp32, served) -> None:
    float32 = served("float32")
    continuations = float32["continuations"]
    assert all(len(set(generated)) > 4 for _, generated in continuations)
    delta = (scored(fp32, continuations) - float32["scores"]).abs().mean()
    print(f"float32: mean |Δ logprob| {delta:.2e}")
    assert delta <= FP32_TOLERANCE, f"mean |Δ logprob| {delta:.2e}"
    for mistake in (swap_gate_and_up, drop_down_bias):
        broken = copy.deepcopy(fp32)
        for layer in broken.model.layers:
            mistake(layer.mlp.experts)
        broken_delta = (scored(broken, continuations) - float32["scores"]).abs().mean()
        print(f"float32: mean |Δ logprob| against a reference with {mistake.__name__}: {broken_delta:.4f}")
        assert broken_delta > 10 * FP32_TOLERANCE, f"{mistake.__name__} passes ({broken_delta:.4f})"


def test_served_in_bf16_is_as_close_to_the_float_reference_as_bf16_allows(fp32, served) -> None:
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bfloat16 = served("bfloat16")
    choices, continuations = bfloat16["choices"], bfloat16["continuations"]
    assert all(len(c["token_ids"]) == TOKENS and len(set(c["token_ids"])) > 4 for c in choices)
    expected = scored(fp32, continuations)
    delta = (expected - bfloat16["scores"]).abs().mean()
    bf16_noise = (expected - scored(bf16, continuations)).abs().mean()
    print(f"bf16: mean |Δ logprob| vLLM {delta:.4f}, transformers bf16 {bf16_noise:.4f}")
    assert delta <= BF16_FACTOR * bf16_noise, (delta, bf16_noise)
    flips, bf16_flips = 0, 0
    for choice in choices:
        reference = reference_logprobs(fp32, choice["prompt_token_ids"], choice["token_ids"])
        top2 = reference.topk(2, -1).values
        confident = (top2[:, 0] - top2[:, 1]) > MARGIN
        tokens = torch.tensor(choice["token_ids"])
        assert torch.equal(reference.argmax(-1)[confident], tokens[confident])
        flips += int((reference.argmax(-1) != tokens).sum())
        bf16_argmax = reference_logprobs(bf16, choice["prompt_token_ids"], choice["token_ids"]).argmax(-1)
        bf16_flips += int((reference.argmax(-1) != bf16_argmax).sum())
    assert flips <= bf16_flips, (flips, bf16_flips)


def swap_gate_and_up(experts) -> None:
    w = experts.gate_up_proj.data
    w.copy_(torch.stack((w[..., 1::2], w[..., 0::2]), -1).reshape(w.shape))


def drop_down_bias(experts) -> None:
    experts.down_proj_bias.data.zero_()


def test_unquantized_gpt_oss_saved_by_transformers_serves_its_tokens(tmp_path: Path) -> None:
    """A bf16 gpt-oss as transformers saves it converts as stored, and vLLM CPU serves the prepared folder with the
    original's float32 greedy tokens."""
    src = unquantized_gpt_oss_by_transformers(tmp_path / "src", fresh_seed())
    result = run_cli("convert", src, tmp_path / "prepared")
    assert result.returncode == 0, result.stderr
    served = {}
    for name, folder in (("original", src), ("prepared", tmp_path / "prepared")):
        with vllm_server(folder, tmp_path / f"{name}.log", dtype="float32") as url:
            served[name] = [complete(url, folder, prompt, TOKENS)["token_ids"] for prompt in PROMPTS]
    assert all(len(set(tokens)) > 4 for tokens in served["original"]), "degenerate generations cannot tell apart"
    assert served["prepared"] == served["original"]


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM CPU's mxfp4 MoE kernel needs AMX tiles")
def test_default_folder_on_an_amx_cpu_serves_the_originals_tokens_and_logprobs(tiny, tmp_path: Path) -> None:
    """On a CPU with AMX vLLM CPU serves the original gpt-oss on its own mxfp4 kernel, packing the experts at load.
    ``convert`` with default flags writes them packed for that kernel (backend cpu), and the folder serves the
    original's greedy tokens with the original's log-probabilities, bit for bit: the same kernel on the same bytes.
    (Bytes packed twice, or not at all, give other tokens.)"""
    src, dest = tiny("gpt-oss"), tmp_path / "prepared"
    result = run_cli("convert", src, dest)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("backend cpu: vLLM CPU runs mxfp4 MoE on its AMX kernel"), result.stdout
    served = {}
    for name, folder in (("original", src), ("prepared", dest)):
        with vllm_server(folder, tmp_path / f"{name}.log") as url:
            choices = [complete(url, folder, prompt, TOKENS, logprobs=1) for prompt in PROMPTS]
        served[name] = [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in choices]
    for name in served:  # both on vLLM's own AMX kernel
        assert "Using 'CPU' Mxfp4 MoE backend." in (tmp_path / f"{name}.log").read_text(), name
    assert all(len(set(tokens)) > 4 for tokens, _ in served["original"]), "degenerate generations cannot tell apart"
    assert served["prepared"] == served["original"]


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
