"""DeepSeek-V2/V3 and Kimi-K2: MLA attention, sigmoid/group-limited routing with
``e_score_correction_bias``, shared experts, ``routed_scaling_factor``, first k layers dense."""

from __future__ import annotations

from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family


def deepseek_moe_layers(config: dict[str, Any]) -> tuple[int, ...]:
    """MoE layers per the DeepSeek rule: index >= first_k_dense_replace and on the moe_layer_freq grid."""
    first, freq = config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1)
    return tuple(i for i in range(config["num_hidden_layers"]) if i >= first and i % freq == 0)


def deepseek_style_mlps(layer: str, config: dict[str, Any], moe: bool, router_bias: bool) -> dict[str, TensorSpec]:
    """Dense MLP, or router + routed experts + merged shared experts (DeepSeek and GLM-4-MoE naming)."""
    hidden = config["hidden_size"]
    if not moe:
        return common.gated_mlp(f"{layer}.mlp", hidden, config["intermediate_size"])
    experts, inter = config["n_routed_experts"], config["moe_intermediate_size"]
    specs = {f"{layer}.mlp.gate.weight": TensorSpec((experts, hidden))}
    if router_bias:
        specs[f"{layer}.mlp.gate.e_score_correction_bias"] = TensorSpec((experts,), "F32", "bias")
    specs |= common.per_expert_mlps(f"{layer}.mlp.experts", experts, hidden, inter)
    if config.get("n_shared_experts"):
        specs |= common.gated_mlp(f"{layer}.mlp.shared_experts", hidden, inter * config["n_shared_experts"])
    return specs


def mtp_layers(config: dict[str, Any]) -> range:
    """The multi-token-prediction layers stored after the decoder (``num_nextn_predict_layers``: 1 in DeepSeek-V3/R1
    and GLM-4.5 as released): vLLM's MTP draft model loads them; the main model skips them."""
    first = config["num_hidden_layers"]
    return range(first, first + (config.get("num_nextn_predict_layers") or 0))


def mtp_extra_specs(layer: str, config: dict[str, Any], embed_and_head: bool) -> dict[str, TensorSpec]:
    """What an MTP layer holds beside a decoder layer: the two input norms, the projection of their
    concatenation, the head's norm, and (DeepSeek) its own embedding and LM head copies."""
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    specs = {
        f"{layer}.enorm.weight": TensorSpec((hidden,), init="norm"),
        f"{layer}.hnorm.weight": TensorSpec((hidden,), init="norm"),
        f"{layer}.eh_proj.weight": TensorSpec((hidden, 2 * hidden)),
        f"{layer}.shared_head.norm.weight": TensorSpec((hidden,), init="norm"),
    }
    if embed_and_head:
        specs[f"{layer}.embed_tokens.weight"] = TensorSpec((vocab, hidden))
        specs[f"{layer}.shared_head.head.weight"] = TensorSpec((vocab, hidden))
    return specs


def deepseek_style_moe_spec(config: dict[str, Any], moe_layers: tuple[int, ...]) -> MoeSpec:
    return MoeSpec(
        num_experts=config["n_routed_experts"],
        top_k=config["num_experts_per_tok"],
        moe_layers=moe_layers,
        expert_intermediate=config["moe_intermediate_size"],
        expert_format="per-expert",
        shared_intermediate=config["moe_intermediate_size"] * (config.get("n_shared_experts") or 0),
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        renormalize=bool(config.get("norm_topk_prob", True)),
        extra={
            "n_group": config.get("n_group"),
            "topk_group": config.get("topk_group"),
            "scoring_func": config.get("scoring_func", "sigmoid"),
        },
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
