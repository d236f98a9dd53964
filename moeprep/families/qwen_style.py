"""The Qwen MoE layout that Qwen2-MoE and Qwen3-MoE share: sparse-layer placement, the tensor inventory (with or
without the gated shared expert, with or without q/k norms) and the MoE structure. Family modules import this,
never each other."""

from __future__ import annotations

from typing import Any

from moeprep.families import common
from moeprep.families.base import MoeSpec
from moeprep.families.tensor_spec import TensorSpec


def sparse_layers(config: dict[str, Any]) -> tuple[int, ...]:
    """Layers with an MoE block, per transformers' Qwen2/Qwen3-MoE rule."""
    step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers", []))
    return tuple(
        i
        for i in range(config["num_hidden_layers"])
        if i not in dense and config["num_experts"] > 0 and (i + 1) % step == 0
    )


def qwen_moe_tensor_specs(config: dict[str, Any], qwen3: bool) -> dict[str, TensorSpec]:
    """Qwen2-MoE (biased q/k/v, gated shared expert) and Qwen3-MoE (q/k norms, no shared expert)."""
    hidden, specs = config["hidden_size"], common.decoder_shell(config)
    moe = set(sparse_layers(config))
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        specs |= common.layer_norms(layer, hidden) | common.attention(layer, config, qkv_bias=not qwen3, qk_norm=qwen3)
        if i not in moe:
            specs |= common.gated_mlp(f"{layer}.mlp", hidden, config["intermediate_size"])
            continue
        specs[f"{layer}.mlp.gate.weight"] = TensorSpec((config["num_experts"], hidden))
        specs |= common.per_expert_mlps(
            f"{layer}.mlp.experts", config["num_experts"], hidden, config["moe_intermediate_size"]
        )
        if not qwen3:
            specs |= common.gated_mlp(f"{layer}.mlp.shared_expert", hidden, config["shared_expert_intermediate_size"])
            specs[f"{layer}.mlp.shared_expert_gate.weight"] = TensorSpec((1, hidden))
    return specs


def qwen_moe_spec(config: dict[str, Any], qwen3: bool) -> MoeSpec:
    """Qwen2-MoE: sigmoid-gated shared expert, no top-k renormalisation by default; Qwen3-MoE: none, renormalised."""
    return MoeSpec(
        num_experts=config["num_experts"],
        top_k=config["num_experts_per_tok"],
        moe_layers=sparse_layers(config),
        expert_intermediate=config["moe_intermediate_size"],
        expert_format="per-expert",
        shared_intermediate=0 if qwen3 else config["shared_expert_intermediate_size"],
        shared_gate=not qwen3,
        renormalize=config.get("norm_topk_prob", qwen3),
    )
