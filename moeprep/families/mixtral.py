"""Mixtral (8x7B, 8x22B): ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

from __future__ import annotations

from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family

MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")


@register_family
class Mixtral(Family):
    name = "mixtral"
    model_types = ("mixtral",)
    architecture = "MixtralForCausalLM"
    expert_lora_modules = ("w1", "w3", "w2")

    def tiny_config(self) -> dict[str, Any]:
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "mixtral",
            "num_hidden_layers": 2,
            "intermediate_size": 64,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.02,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "rope_theta": 1000000.0,
        }

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        hidden, specs = config["hidden_size"], common.decoder_shell(config)
        experts = config["num_local_experts"]
        for i in range(config["num_hidden_layers"]):
            layer = f"model.layers.{i}"
            specs |= common.layer_norms(layer, hidden) | common.attention(layer, config)
            specs[f"{layer}.block_sparse_moe.gate.weight"] = TensorSpec((experts, hidden))
            specs |= common.per_expert_mlps(
                f"{layer}.block_sparse_moe.experts", experts, hidden, config["intermediate_size"], MIXTRAL_EXPERT_NAMES
            )
        return specs

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        return MoeSpec(
            num_experts=config["num_local_experts"],
            top_k=config["num_experts_per_tok"],
            moe_layers=tuple(range(config["num_hidden_layers"])),
            expert_intermediate=config["intermediate_size"],
            expert_format="per-expert",
        )
