"""GLM-4.5 / GLM-4.6 MoE: DeepSeek-style routing (sigmoid, correction bias, shared experts,
``routed_scaling_factor``) on grouped-query attention with biased q/k/v and partial rotary."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family
from moeprep.families.config_view import ConfigView
from moeprep.families.deepseek_style import (
    deepseek_style_mlps,
    deepseek_style_moe_spec,
    mtp_extra_specs,
    mtp_layers,
    without_unstored_mtp_layers,
)


def glm_moe_layers(config: dict[str, Any]) -> tuple[int, ...]:
    return tuple(range(config.get("first_k_dense_replace", 0), config["num_hidden_layers"]))


@register_family
class Glm4Moe(Family):
    name = "glm4-moe"
    model_types = ("glm4_moe",)
    architecture = "Glm4MoeForCausalLM"
    shared_expert_module = "shared_experts"
    fused_shared_architecture = "MoeprepFusedGlm4MoeForCausalLM"
    presets = {
        "air": {
            "hidden_size": 4096,
            "moe_intermediate_size": 1408,
            "n_routed_experts": 128,
            "num_experts_per_tok": 8,
            "intermediate_size": 10944,
            "num_attention_heads": 96,
            "num_key_value_heads": 8,
            "head_dim": 128,
        }
    }

    def tiny_config(self) -> dict[str, Any]:
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "glm4_moe",
            "num_hidden_layers": 3,
            "head_dim": 64,
            "partial_rotary_factor": 0.5,
            "attention_bias": True,
            "use_qk_norm": False,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "num_nextn_predict_layers": 0,
            "attention_dropout": 0.0,
            "rope_scaling": None,
            "rms_norm_eps": 1e-5,
        }

    def as_stored(self, config: ConfigView, tensor_names: Collection[str]) -> ConfigView:
        return without_unstored_mtp_layers(config, tensor_names)

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        hidden, specs = config["hidden_size"], common.decoder_shell(config)
        mtp = mtp_layers(config)
        moe = set(glm_moe_layers(config)) | set(mtp)
        for i in [*range(config["num_hidden_layers"]), *mtp]:
            layer = f"model.layers.{i}"
            if i in mtp:
                specs |= mtp_extra_specs(layer, config, embed_and_head=False)
            specs |= common.layer_norms(layer, hidden)
            specs |= common.attention(
                layer, config, qkv_bias=config.get("attention_bias", True), qk_norm=config.get("use_qk_norm", False)
            )
            specs |= deepseek_style_mlps(layer, config, i in moe, router_bias=True)
        return specs

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        return deepseek_style_moe_spec(config, glm_moe_layers(config))
