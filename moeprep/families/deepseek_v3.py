"""DeepSeek-V2/V3 and Kimi-K2: MLA attention, sigmoid/group-limited routing with
``e_score_correction_bias``, shared experts, ``routed_scaling_factor``, first k layers dense."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family
from moeprep.families.config_view import ConfigView
from moeprep.families.deepseek_style import (
    deepseek_moe_layers,
    deepseek_style_mlps,
    deepseek_style_moe_spec,
    mtp_extra_specs,
    mtp_layers,
    without_unstored_mtp_layers,
)


@register_family
class DeepseekV3(Family):
    name = "deepseek-v3"
    model_types = ("deepseek_v3", "kimi_k2")
    architecture = "DeepseekV3ForCausalLM"
    shared_expert_module = "shared_experts"
    fused_shared_architecture = "MoeprepFusedDeepseekV3ForCausalLM"
    presets = {
        "v3": {
            "hidden_size": 7168,
            "moe_intermediate_size": 2048,
            "n_routed_experts": 256,
            "num_experts_per_tok": 8,
            "n_group": 8,
            "topk_group": 4,
            "intermediate_size": 18432,
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
        }
    }

    def tiny_config(self) -> dict[str, Any]:
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "deepseek_v3",
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "q_lora_rank": 96,
            # vLLM's MLA kernels take DeepSeek's own head dims only (CPU: kv_lora_rank + rope = 576;
            # CUDA prefill: nope 128, rope 64, v 128)
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "num_nextn_predict_layers": 0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "aux_loss_alpha": 0.001,
            "seq_aux": True,
            "ep_size": 1,
            "rope_scaling": None,
        }

    def as_stored(self, config: ConfigView, tensor_names: Collection[str]) -> ConfigView:
        return without_unstored_mtp_layers(config, tensor_names)

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        hidden, specs = config["hidden_size"], common.decoder_shell(config)
        heads, q_rank, kv_rank = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
        nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
        mtp = mtp_layers(config)
        moe = set(deepseek_moe_layers(config)) | set(mtp)
        for i in [*range(config["num_hidden_layers"]), *mtp]:
            layer, attn = f"model.layers.{i}", f"model.layers.{i}.self_attn"
            if i in mtp:
                specs |= mtp_extra_specs(layer, config, embed_and_head=True)
            specs |= common.layer_norms(layer, hidden)
            if q_rank:
                specs[f"{attn}.q_a_proj.weight"] = TensorSpec((q_rank, hidden))
                specs[f"{attn}.q_a_layernorm.weight"] = TensorSpec((q_rank,), init="norm")
                specs[f"{attn}.q_b_proj.weight"] = TensorSpec((heads * (nope + rope), q_rank))
            else:
                specs[f"{attn}.q_proj.weight"] = TensorSpec((heads * (nope + rope), hidden))
            specs[f"{attn}.kv_a_proj_with_mqa.weight"] = TensorSpec((kv_rank + rope, hidden))
            specs[f"{attn}.kv_a_layernorm.weight"] = TensorSpec((kv_rank,), init="norm")
            specs[f"{attn}.kv_b_proj.weight"] = TensorSpec((heads * (nope + v_dim), kv_rank))
            specs[f"{attn}.o_proj.weight"] = TensorSpec((hidden, heads * v_dim))
            specs |= deepseek_style_mlps(layer, config, i in moe, router_bias=config.get("topk_method") == "noaux_tc")
        return specs

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        return deepseek_style_moe_spec(config, deepseek_moe_layers(config))
