"""MoE LoRA on a ``convert --tp N`` base: the split adapter, sliced per rank by vLLM's own MoE LoRA code, merged
into each rank's expert files, equals that rank's slice of PEFT's merge of the original adapter into the
original model (fp32, 1e-6); an expert-parallel base is refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from vllm.lora.layers.fused_moe import FusedMoEWithLoRA

from moeprep.families import get_family
from tests.conftest import run_cli
from tests.test_lora import BY_MODULES, BY_PARAMETERS, PREFIX, peft_adapter, split_scaling


def vllm_rank_slices(tensors: dict[str, torch.Tensor], module: str, experts: int, rank: int, tp: int, inter: int):
    """(gate, up, down) (A, B) pairs of every expert as vLLM's ``FusedMoEWithLoRA.set_lora`` slices them on
    ``rank`` (stacked [E, ...], the default not-fully-sharded mode)."""
    layer = SimpleNamespace(tp_size=tp, tp_rank=rank, intermediate_size_per_partition=inter // tp, fully_sharded=False)

    def stacked(proj: str, factor: str) -> torch.Tensor:
        return torch.stack([tensors[f"{PREFIX}{module}.{e}.{proj}.lora_{factor}.weight"] for e in range(experts)])

    pairs = {}
    for proj in ("gate_proj", "up_proj"):
        a = FusedMoEWithLoRA._slice_w13_a(layer, stacked(proj, "A"))
        pairs[proj] = (a, FusedMoEWithLoRA._slice_w13_b(layer, stacked(proj, "B")))
    pairs["down_proj"] = (
        FusedMoEWithLoRA._slice_w2_a(layer, stacked("down_proj", "A")),
        FusedMoEWithLoRA._slice_w2_b(layer, stacked("down_proj", "B")),
    )
    return pairs


@pytest.mark.parametrize("targets", [BY_MODULES, BY_PARAMETERS], ids=["modules", "parameters"])
def test_split_adapter_sliced_by_vllm_matches_each_rank_of_a_tensor_parallel_base(
    tiny, tmp_path: Path, targets: dict
) -> None:
    tp = 2
    base = tmp_path / "tp"
    assert run_cli("convert", tiny("qwen3-moe"), base, "--tp", str(tp)).returncode == 0
    peft_model, adapter = peft_adapter(tiny("qwen3-moe"), tmp_path / "adapter", r=4, lora_alpha=8, **targets)
    out = tmp_path / "split"
    result = run_cli("lora", "split", adapter, "--base", base, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"--tensor-parallel-size {tp}" in " ".join(result.stdout.split())
    assert json.loads((out / "moeprep_lora.json").read_text())["tensor_parallel_size"] == tp
    tensors, scaling = load_file(out / "adapter_model.safetensors"), split_scaling(out)
    moe = get_family("qwen3-moe").moe_spec(json.loads((base / "config.json").read_text()))
    inter, experts, width = moe.expert_intermediate, moe.num_experts, moe.expert_intermediate // tp
    merged = peft_model.merge_and_unload()
    for rank in range(tp):
        rank_weights = load_file(base / f"model-rank-{rank}-part-00001.safetensors")
        rows = slice(rank * width, (rank + 1) * width)
        for layer in moe.moe_layers:
            module = f"model.layers.{layer}.mlp.experts"
            pairs = vllm_rank_slices(tensors, module, experts, rank, tp, inter)
            reference = merged.model.layers[layer].mlp.experts
            for e in range(experts):
                expected = {
                    "gate_proj": reference.gate_up_proj[e][:inter][rows],
                    "up_proj": reference.gate_up_proj[e][inter:][rows],
                    "down_proj": reference.down_proj[e][:, rows],
                }
                for proj, (a, b) in pairs.items():
                    base_slice = rank_weights[f"{module}.{e}.{proj}.weight"].float()
                    ours = base_slice + scaling * b[e] @ a[e]
                    torch.testing.assert_close(ours, expected[proj], rtol=1e-6, atol=1e-6)
                    assert (ours - base_slice).abs().max() > 1e-3  # the adapter changes this rank's slice


def test_lora_split_refuses_an_expert_parallel_base(tiny, tmp_path: Path) -> None:
    dest = tmp_path / "ep"
    assert run_cli("convert", tiny("qwen2-moe"), dest, "--ep", "2").returncode == 0
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    result = run_cli("lora", "split", tmp_path / "adapter", "--base", dest, "--out", tmp_path / "split")
    assert result.returncode == 2 and "expert parallelism 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "split").exists()
