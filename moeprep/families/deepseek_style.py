"""The DeepSeek-style MoE layout that DeepSeek-V3/R1, Kimi-K2 and GLM-4-MoE share: MoE layer placement, the
MLP inventory (router, per-expert experts, merged shared experts), multi-token-prediction layers and the MoE
structure. Family modules import this, never each other."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from moeprep.families import common
from moeprep.families.base import MoeSpec
from moeprep.families.config_view import ConfigView
from moeprep.families.tensor_spec import TensorSpec


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


def without_unstored_mtp_layers(config: ConfigView, tensor_names: Collection[str]) -> ConfigView:
    """``config`` with no MTP layers when the checkpoint stores none of theirs: transformers writes
    ``num_nextn_predict_layers: 1`` (its default) but no MTP weights when it saves such a model (a fine-tune, say),
    and vLLM serves the main model without them. Where some are stored, the inventory names what is missing."""
    prefixes = tuple(f"model.layers.{i}." for i in mtp_layers(config))
    if not prefixes or any(name.startswith(prefixes) for name in tensor_names):
        return config
    return config.with_value("num_nextn_predict_layers", 0)


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
