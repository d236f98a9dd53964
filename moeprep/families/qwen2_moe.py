"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): routed experts plus one sigmoid-gated shared expert."""

from __future__ import annotations

from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family
from moeprep.families.qwen_style import qwen_moe_spec, qwen_moe_tensor_specs


@register_family
class Qwen2Moe(Family):
    name = "qwen2-moe"
    model_types = ("qwen2_moe",)
    architecture = "Qwen2MoeForCausalLM"
    shared_expert_module = "shared_expert"
    shared_expert_gate_module = "shared_expert_gate"
    fused_shared_architecture = "MoeprepFusedQwen2MoeForCausalLM"

    def tiny_config(self) -> dict[str, Any]:
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "qwen2_moe",
            "num_hidden_layers": 2,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 128,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "use_sliding_window": False,
            "sliding_window": 2048,
            "max_window_layers": 2,
            "attention_dropout": 0.0,
            "rope_theta": 1000000.0,
        }

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        return qwen_moe_tensor_specs(config, qwen3=False)

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        return qwen_moe_spec(config, qwen3=False)
