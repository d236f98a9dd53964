"""Backend ``dequant``: gpt-oss mxfp4 experts as vLLM's mxfp4 parameters hold them before any kernel
transform, for the moeprep runtime's per-expert dequantizing MoE (vLLM CPU has no mxfp4 MoE kernel
without AMX).

``w13``/``w2`` values are the checkpoint's packed e2m1 bytes [E, N, K/2] (gate/up rows interleaved),
scales its e8m0 bytes [E, N, K/32], biases bf16 [E, N]; nothing is padded.
"""

from __future__ import annotations

import torch

from moeprep.layouts.mxfp4_experts import (
    MXFP4_BLOCK,
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    contiguous_strides,
    packed_blocks,
)

NAME = "dequant"
ARCHES = ("any",)
INTERMEDIATE_MULTIPLE = 1
HIDDEN_MULTIPLE = 1
KNOBS: dict[str, int] = {}
RECIPE_VERSION = 1
SERVE_FLAGS: tuple[str, ...] = ()
VERIFIED_VLLM = ["0.32.0"]
EXPERTS_MODULE = "mlp.experts.routed_experts"


def expert_dims(experts: int, hidden: int, intermediate: int) -> Mxfp4ExpertDims:
    return Mxfp4ExpertDims.padded(experts, hidden, intermediate, HIDDEN_MULTIPLE, INTERMEDIATE_MULTIPLE)


def _unchanged(param: str, source: str, dtype: str, shape: tuple[int, ...], recipe: str, transform):
    return PreparedExpertTensor(param, source, dtype, shape, shape, contiguous_strides(shape), recipe, transform)


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    """w13 = gate_up (rows 2I, reduction H), w2 = down (rows H, reduction I)."""
    e, h, i = dims.experts, dims.hidden, dims.intermediate
    keep = torch.Tensor.contiguous
    return [
        _unchanged(
            "moeprep_w13_weight", "gate_up_proj_blocks", "U8", (e, 2 * i, h // 2), "mxfp4-packed", packed_blocks
        ),
        _unchanged("moeprep_w13_scale", "gate_up_proj_scales", "U8", (e, 2 * i, h // MXFP4_BLOCK), "copy", keep),
        _unchanged("moeprep_w13_bias", "gate_up_proj_bias", "BF16", (e, 2 * i), "copy", keep),
        _unchanged("moeprep_w2_weight", "down_proj_blocks", "U8", (e, h, i // 2), "mxfp4-packed", packed_blocks),
        _unchanged("moeprep_w2_scale", "down_proj_scales", "U8", (e, h, i // MXFP4_BLOCK), "copy", keep),
        _unchanged("moeprep_w2_bias", "down_proj_bias", "BF16", (e, h), "copy", keep),
    ]
