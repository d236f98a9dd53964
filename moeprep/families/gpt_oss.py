"""gpt-oss (20b, 120b): mxfp4 experts stored as ``*_blocks`` (two e2m1 values per byte, 32-value
blocks) and ``*_scales`` (e8m0 exponents, one per block), bf16 expert biases, a biased router, and
attention sinks. ``gate_up_proj`` rows interleave gate (even) and up (odd). Unquantized gpt-oss checkpoints
(no ``quantization_config``, as transformers saves a bf16 model) hold each layer's experts as 3-D tensors
``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H] with their biases, which vLLM loads as stored."""

from __future__ import annotations

from typing import Any

from moeprep.errors import UnsupportedModelError
from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family
from moeprep.schema.manifest import checkpoint_quantization

MXFP4_BLOCK = 32
MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
_REAL_DIMS = {
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
}


def mxfp4_expert_specs(prefix: str, experts: int, rows: int, cols: int) -> dict[str, TensorSpec]:
    """``{prefix}_blocks`` [E, rows, cols/32, 16] u8, ``_scales`` [E, rows, cols/32] u8, ``_bias`` [E, rows] bf16."""
    blocks = cols // MXFP4_BLOCK
    return {
        f"{prefix}_blocks": TensorSpec((experts, rows, blocks, MXFP4_BLOCK // 2), "U8", "mxfp4_blocks"),
        f"{prefix}_scales": TensorSpec((experts, rows, blocks), "U8", "e8m0_scales"),
        f"{prefix}_bias": TensorSpec((experts, rows), "BF16", "bias"),
    }


def unquantized_expert_specs(prefix: str, experts: int, hidden: int, inter: int) -> dict[str, TensorSpec]:
    """The 3-D bf16 experts of an unquantized gpt-oss (applied as ``x @ W``) and their biases."""
    return {
        f"{prefix}.gate_up_proj": TensorSpec((experts, hidden, 2 * inter), fan_in_dim=-2),
        f"{prefix}.gate_up_proj_bias": TensorSpec((experts, 2 * inter), "BF16", "bias"),
        f"{prefix}.down_proj": TensorSpec((experts, inter, hidden), fan_in_dim=-2),
        f"{prefix}.down_proj_bias": TensorSpec((experts, hidden), "BF16", "bias"),
    }


def stores_mxfp4(config: Any) -> bool:
    """Whether the experts are mxfp4 (gpt-oss as released) rather than unquantized (also for a prepared folder's
    config); other quantizations are refused."""
    quant = checkpoint_quantization(config)
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in (None, "mxfp4"):
        raise UnsupportedModelError(
            f"gpt-oss with quantization_config {method!r} is not supported; moeprep reads mxfp4 (as released) and "
            "unquantized gpt-oss checkpoints"
        )
    return method == "mxfp4"


@register_family
class GptOss(Family):
    name = "gpt-oss"
    model_types = ("gpt_oss",)
    architecture = "GptOssForCausalLM"
    expert_lora_modules = ("w1", "w3", "w2")  # vLLM's expert mapping for gpt-oss
    gate_up_interleaved = True
    vllm_3d_expert_lora = True
    presets = {"20b": {**_REAL_DIMS, "num_local_experts": 32}, "120b": {**_REAL_DIMS, "num_local_experts": 128}}

    def tiny_config(self) -> dict[str, Any]:
        layers = 2
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "gpt_oss",
            "num_hidden_layers": layers,
            "hidden_size": 192,
            "intermediate_size": 192,
            "head_dim": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "experts_per_token": 2,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "initial_context_length": 4096,
            "max_position_embeddings": 131072,
            "layer_types": self._layer_types(layers),
            "output_router_logits": False,
            "quantization_config": dict(MXFP4_QUANTIZATION_CONFIG),
            "rms_norm_eps": 1e-5,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": 150000,
            "router_aux_loss_coef": 0.9,
            "sliding_window": 128,
            "swiglu_limit": 7.0,
        }

    @staticmethod
    def _layer_types(layers: int) -> list[str]:
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]

    def with_num_layers(self, config: dict[str, Any], num_layers: int) -> dict[str, Any]:
        return {**config, "num_hidden_layers": num_layers, "layer_types": self._layer_types(num_layers)}

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        hidden, inter, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
        specs, mxfp4 = common.decoder_shell(config), stores_mxfp4(config)
        for i in range(config["num_hidden_layers"]):
            layer = f"model.layers.{i}"
            specs |= common.layer_norms(layer, hidden)
            specs |= common.attention(layer, config, qkv_bias=True, o_bias=True)
            specs[f"{layer}.self_attn.sinks"] = TensorSpec((config["num_attention_heads"],), "BF16", "bias")
            specs[f"{layer}.mlp.router.weight"] = TensorSpec((experts, hidden))
            specs[f"{layer}.mlp.router.bias"] = TensorSpec((experts,), "BF16", "bias")
            if not mxfp4:
                specs |= unquantized_expert_specs(f"{layer}.mlp.experts", experts, hidden, inter)
                continue
            specs |= mxfp4_expert_specs(f"{layer}.mlp.experts.gate_up_proj", experts, 2 * inter, hidden)
            specs |= mxfp4_expert_specs(f"{layer}.mlp.experts.down_proj", experts, hidden, inter)
        return specs

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        return MoeSpec(
            num_experts=config["num_local_experts"],
            top_k=config["num_experts_per_tok"],
            moe_layers=tuple(range(config["num_hidden_layers"])),
            expert_intermediate=config["intermediate_size"],
            expert_format="mxfp4" if stores_mxfp4(config) else "fused-3d",
            extra={"swiglu_limit": config.get("swiglu_limit"), "gate_up_interleaved": True},
        )
