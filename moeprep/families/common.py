"""Tensor inventories shared by decoder-only families (names follow Hugging Face Llama-style models)."""

from __future__ import annotations

from typing import Any

from moeprep.families.tensor_spec import TensorSpec
from moeprep.schema.names import PROJECTIONS


def decoder_shell(
    config: dict[str, Any], prefix: str = "model", lm_head: str = "lm_head.weight"
) -> dict[str, TensorSpec]:
    """Embedding, final norm and LM head."""
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    specs = {
        f"{prefix}.embed_tokens.weight": TensorSpec((vocab, hidden)),
        f"{prefix}.norm.weight": TensorSpec((hidden,), init="norm"),
    }
    if not config.get("tie_word_embeddings", False):
        specs[lm_head] = TensorSpec((vocab, hidden))
    return specs


def layer_norms(
    layer: str, hidden: int, names: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
) -> dict[str, TensorSpec]:
    return {f"{layer}.{n}.weight": TensorSpec((hidden,), init="norm") for n in names}


def attention(
    layer: str,
    config: dict[str, Any],
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
) -> dict[str, TensorSpec]:
    """Grouped-query attention ``{layer}.self_attn.{q,k,v,o}_proj``."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    out = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
    attn = f"{layer}.self_attn"
    specs: dict[str, TensorSpec] = {}
    for name, rows in out.items():
        specs[f"{attn}.{name}.weight"] = TensorSpec((rows, hidden))
        if qkv_bias:
            specs[f"{attn}.{name}.bias"] = TensorSpec((rows,), init="bias")
    specs[f"{attn}.o_proj.weight"] = TensorSpec((hidden, heads * head_dim))
    if o_bias:
        specs[f"{attn}.o_proj.bias"] = TensorSpec((hidden,), init="bias")
    if qk_norm:
        specs[f"{attn}.q_norm.weight"] = TensorSpec((head_dim,), init="norm")
        specs[f"{attn}.k_norm.weight"] = TensorSpec((head_dim,), init="norm")
    return specs


def gated_mlp(
    prefix: str, hidden: int, intermediate: int, names: tuple[str, str, str] = PROJECTIONS
) -> dict[str, TensorSpec]:
    """SwiGLU MLP ``{prefix}.{gate,up,down}`` with down projecting back to ``hidden``."""
    gate, up, down = names
    return {
        f"{prefix}.{gate}.weight": TensorSpec((intermediate, hidden)),
        f"{prefix}.{up}.weight": TensorSpec((intermediate, hidden)),
        f"{prefix}.{down}.weight": TensorSpec((hidden, intermediate)),
    }


def per_expert_mlps(
    prefix: str, num_experts: int, hidden: int, intermediate: int, names: tuple[str, str, str] = PROJECTIONS
) -> dict[str, TensorSpec]:
    """Routed experts stored one module each: ``{prefix}.{e}.{gate,up,down}``."""
    specs: dict[str, TensorSpec] = {}
    for e in range(num_experts):
        specs.update(gated_mlp(f"{prefix}.{e}", hidden, intermediate, names))
    return specs


TINY_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "max_position_embeddings": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
