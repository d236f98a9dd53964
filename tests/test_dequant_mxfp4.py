"""The ``dequant`` runtime path (gpt-oss mxfp4 experts on CPUs without AMX) against transformers'
GptOssExperts, which dequantizes the same checkpoint with its own code."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it for mxfp4

from moeprep.runtime.cpu_mxfp4 import DequantMxfp4MoEMethod  # noqa: E402

EXPERTS = "model.layers.{}.mlp.experts.routed_experts."


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("dequant") / "out"
    result = run_cli("convert", tiny("gpt-oss"), dest, "--backend", "dequant")
    assert result.returncode == 0, result.stderr
    return dest


@pytest.fixture(scope="module")
def reference_model(tiny):
    """transformers' gpt-oss with the mxfp4 experts dequantized by transformers, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(tiny("gpt-oss")).float().eval()


def prepared_layer(folder: Path, layer: int) -> SimpleNamespace:
    tensors = {}
    for shard in folder.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    prefix = EXPERTS.format(layer)
    params = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    return SimpleNamespace(expert_map=None, **params)


@pytest.mark.parametrize("layer", [0, 1])
def test_dequant_experts_match_transformers(prepared: Path, reference_model, layer: int) -> None:
    config = reference_model.config
    experts = reference_model.model.layers[layer].mlp.experts
    generator = torch.Generator().manual_seed(layer)
    tokens = 37
    x = torch.randn(tokens, config.hidden_size, generator=generator)
    logits = torch.randn(tokens, config.num_local_experts, generator=generator)
    top_values, top_ids = logits.topk(config.num_experts_per_tok, dim=-1)
    weights = top_values.softmax(-1)
    with torch.no_grad():
        expected = experts(x, top_ids, weights)
    method = DequantMxfp4MoEMethod.__new__(DequantMxfp4MoEMethod)  # apply() needs no vLLM layer config
    got = method.apply(prepared_layer(prepared, layer), x, weights, top_ids.to(torch.int32))
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().mean() > 1e-2  # the experts did something


def test_experts_routed_to_another_rank_are_skipped(prepared: Path, reference_model) -> None:
    """With expert parallelism vLLM maps global ids to local ones; -1 marks another rank's expert."""
    config = reference_model.config
    layer = prepared_layer(prepared, 0)
    num_experts = config.num_local_experts
    layer.expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    layer.expert_map[0] = 0  # this rank holds expert 0 only
    x = torch.randn(5, config.hidden_size)
    ids = torch.tensor([[0, 1]] * 5, dtype=torch.int32)
    weights = torch.tensor([[0.75, 0.25]] * 5)
    method = DequantMxfp4MoEMethod.__new__(DequantMxfp4MoEMethod)
    only_zero = method.apply(layer, x, weights, ids)
    with torch.no_grad():
        expected = reference_model.model.layers[0].mlp.experts(
            x, torch.zeros(5, 1, dtype=torch.long), torch.full((5, 1), 0.75)
        )
    torch.testing.assert_close(only_zero, expected, rtol=1e-5, atol=1e-5)
