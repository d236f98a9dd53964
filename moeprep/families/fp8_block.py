"""Block-scaled fp8 checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3 FP8): ``quant_method: fp8`` with
``weight_block_size [bn, bk]``. Every linear weight ``[out, in]`` is stored as ``F8_E4M3`` with a ``F32``
``weight_scale_inv [ceil(out / bn), ceil(in / bk)]`` beside it (the weight is ``fp8 * scale_inv`` per
block); embeddings, the LM head, norms, routers and the modules the config lists as not converted stay
in their original dtype. Also the block math: quantize a float weight, dequantize a stored one."""

from __future__ import annotations

import math
from typing import Any

import torch

from moeprep.errors import UnsupportedModelError
from moeprep.families.tensor_spec import TensorSpec
from moeprep.schema.manifest import checkpoint_quantization
from moeprep.schema.names import SCALE_SUFFIX

# quantization_config of DeepSeek-V3's own checkpoint (block 128 x 128, dynamic activation scales)
DEEPSEEK_FP8_CONFIG: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
# Modules kept in high precision in every known block-fp8 MoE checkpoint: embeddings, LM heads, routers, and the
# MTP layer's input projection (vLLM builds it as a plain nn.Linear).
NEVER_QUANTIZED = ("embed_tokens", "lm_head", "shared_head.head", "eh_proj", "mlp.gate", "shared_expert_gate")


def block_size(config: dict[str, Any]) -> tuple[int, int] | None:
    """``(bn, bk)`` for a block-fp8 checkpoint, None for an unquantized or mxfp4 one; refuses others."""
    quant = checkpoint_quantization(config)
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method in (None, "mxfp4"):
        return None
    block = quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise UnsupportedModelError(
            f"quantization_config {method!r} (weight_block_size {block!r}) is not supported; moeprep reads "
            "bf16/fp16/fp32, block-scaled fp8 (quant_method fp8 with weight_block_size [n, k]) and mxfp4 checkpoints"
        )
    return block[0], block[1]


def quantized(specs: dict[str, TensorSpec], config: dict[str, Any]) -> dict[str, TensorSpec]:
    """``specs`` as a checkpoint with ``config``'s quantization stores them (unchanged when unquantized)."""
    block = block_size(config)
    if block is None:
        return specs
    kept = (*NEVER_QUANTIZED, *(checkpoint_quantization(config).get("modules_to_not_convert") or ()))
    out: dict[str, TensorSpec] = {}
    for name, spec in specs.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or spec.init != "linear" or any(_names(module, k) for k in kept):
            out[name] = spec
            continue
        if len(spec.shape) != 2:
            raise UnsupportedModelError(f"{name}: block-fp8 3-D expert tensors are not supported (per-expert only)")
        rows, cols = spec.shape
        out[name] = TensorSpec(spec.shape, "F8_E4M3", "fp8")
        scale_shape = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        out[f"{module}.{SCALE_SUFFIX}"] = TensorSpec(scale_shape, "F32", "fp8_scale", fan_in=cols)
    return out


def _names(module: str, kept: str) -> bool:
    """Whether ``kept`` (a module name or a run of its dotted parts, as in ``modules_to_not_convert``) names
    ``module`` or a module above it."""
    return f".{kept}." in f".{module}."


def fixture_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """config.json changes that make a fixture a block-fp8 checkpoint vLLM can serve: DeepSeek-V3's
    quantization_config, and the sizes vLLM splits into blocks (MoE and MLP intermediate sizes, the first
    part of a merged projection) rounded up to the block size."""
    bn = DEEPSEEK_FP8_CONFIG["weight_block_size"][0]
    sizes = ("moe_intermediate_size", "intermediate_size", "shared_expert_intermediate_size", "q_lora_rank")
    rounded = {key: math.ceil(config[key] / bn) * bn for key in sizes if config.get(key)}
    return {**rounded, "quantization_config": dict(DEEPSEEK_FP8_CONFIG)}


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _per_element(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """``scale`` [ceil(rows/bn), ceil(cols/bk)] expanded to one value per element of ``shape``."""
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 weight_scale_inv): each block scaled so its largest magnitude maps to 448,
    rounded to nearest; an all-zero block (padding) gets the unit scale."""
    rows, cols = weight.shape
    bn, bk = block
    padded = torch.zeros(-(-rows // bn) * bn, -(-cols // bk) * bk, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    amax = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    quantized = (weight.float() / _per_element(scale, block, weight.shape)).clamp(-E4M3_MAX, E4M3_MAX)
    return quantized.to(torch.float8_e4m3fn), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``weight * weight_scale_inv`` per block, in ``dtype``."""
    return (weight.float() * _per_element(scale.float(), block, weight.shape)).to(dtype)
