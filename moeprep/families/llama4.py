"""Llama 4 text MoE (Scout, Maverick): top-1 routed experts stored fused as 3-D tensors
``feed_forward.experts.gate_up_proj`` [E, H, 2I] (gate half first) and ``down_proj`` [E, I, H],
plus one always-on ``shared_expert``. The multimodal checkpoints (``model_type: llama4``) keep the
text model under ``language_model.``; tiny fixtures are text-only (``llama4_text``)."""

from __future__ import annotations

from typing import Any

from moeprep.families import common
from moeprep.families.base import Family, MoeSpec, TensorSpec, register_family


def llama4_text_config(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The text config and the tensor-name prefix of the text model."""
    if config.get("model_type") == "llama4":
        return config["text_config"], "language_model."
    return config, ""


def llama4_moe_layers(text: dict[str, Any]) -> tuple[int, ...]:
    if text.get("moe_layers") is not None:
        return tuple(text["moe_layers"])
    step = text.get("interleave_moe_layer_step", 1)
    return tuple(i for i in range(text["num_hidden_layers"]) if (i + 1) % step == 0)


@register_family
class Llama4(Family):
    name = "llama4"
    model_types = ("llama4", "llama4_text")
    architecture = "Llama4ForCausalLM"
    shared_expert_module = "shared_expert"
    fused_shared_architecture = "MoeprepFusedLlama4ForCausalLM"
    moe_block_module = "feed_forward"
    router_weight_on_input = True

    def tiny_config(self) -> dict[str, Any]:
        layers = 2
        return {
            **common.TINY_COMMON,
            "architectures": [self.architecture],
            "model_type": "llama4_text",
            "num_hidden_layers": layers,
            "head_dim": 32,
            "intermediate_size": 64,
            "intermediate_size_mlp": 256,
            "num_local_experts": 8,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
            "moe_layers": list(range(layers)),
            "use_qk_norm": True,
            "no_rope_layers": [1] * layers,
            "attention_chunk_size": 8192,
            "attn_temperature_tuning": True,
            "floor_scale": 8192,
            "attn_scale": 0.1,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "rope_scaling": None,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
        }

    def with_num_layers(self, config: dict[str, Any], num_layers: int) -> dict[str, Any]:
        return {
            **config,
            "num_hidden_layers": num_layers,
            "moe_layers": list(range(num_layers)),
            "no_rope_layers": [1] * num_layers,
        }

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        text, pre = llama4_text_config(config)
        hidden, experts, inter = text["hidden_size"], text["num_local_experts"], text["intermediate_size"]
        specs = common.decoder_shell(text, prefix=f"{pre}model", lm_head=f"{pre}lm_head.weight")
        moe = set(llama4_moe_layers(text))
        for i in range(text["num_hidden_layers"]):
            layer, ff = f"{pre}model.layers.{i}", f"{pre}model.layers.{i}.feed_forward"
            specs |= common.layer_norms(layer, hidden) | common.attention(layer, text)
            if i not in moe:
                specs |= common.gated_mlp(ff, hidden, text["intermediate_size_mlp"])
                continue
            specs[f"{ff}.router.weight"] = TensorSpec((experts, hidden))
            specs[f"{ff}.experts.gate_up_proj"] = TensorSpec((experts, hidden, 2 * inter), fan_in_dim=-2)
            specs[f"{ff}.experts.down_proj"] = TensorSpec((experts, inter, hidden), fan_in_dim=-2)
            specs |= common.gated_mlp(f"{ff}.shared_expert", hidden, inter)
        return specs

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        text, _ = llama4_text_config(config)
        return MoeSpec(
            num_experts=text["num_local_experts"],
            top_k=text["num_experts_per_tok"],
            moe_layers=llama4_moe_layers(text),
            expert_intermediate=text["intermediate_size"],
            expert_format="fused-3d",
            shared_intermediate=text["intermediate_size"],
            renormalize=False,
            extra={"router_activation": "sigmoid"},
        )
