"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): routed experts only, q/k norms, no biases."""

from __future__ import annotations

from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family
from moeprep.families.qwen_style import qwen_moe_spec, qwen_moe_tensor_specs


@register_family
class Qwen3Moe(Family):
    name = "qwen3-moe"
    model_types = ("qwen3_moe",)
    architecture = "Qwen3MoeForCausalLM"
    presets = {
        "30b-a3b": {
            "hidden_size": 2048,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 6144,
        }
    }

    def tiny_config(self) -> dict[str, Any]:
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "qwen3_moe",
            "num_hidden_layers": 2,
            "head_dim": 32,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 2,
            "rope_theta": 1000000.0,
        }

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        return qwen_moe_tensor_specs(config, qwen3=True)

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        return qwen_moe_spec(config, qwen3=True)
