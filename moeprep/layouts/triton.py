"""Backend ``triton``: vLLM 0.26's ``OAITritonMxfp4Experts`` (triton_kernels ``matmul_ogs``).

What vLLM does at load (vllm/model_executor/layers/fused_moe/oracle/mxfp4.py): intermediate size
rounded up to 64 (hidden unchanged), checkpoint tensors copied into the top-left corner of the
zero-padded parameters, biases cast to float32, then ``_swizzle_mxfp4``: ``triton_hopper`` on sm90,
``triton_blackwell`` on sm100.
"""

from __future__ import annotations

import torch

from moeprep.layouts.backend import LayoutBackend, register, same_padding
from moeprep.layouts.mxfp4_experts import (
    MXFP4_BLOCK,
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    contiguous_strides,
    packed_blocks,
    transposed_view,
)
from moeprep.layouts.padding import pad_to
from moeprep.layouts.triton_blackwell import (
    blackwell_scale_storage_shape,
    blackwell_value_storage_shape,
    swizzle_blackwell_scale,
    swizzle_blackwell_value,
)
from moeprep.layouts.triton_hopper import (
    hopper_scale_storage_shape,
    hopper_value_storage_shape,
    swizzle_hopper_scale,
    swizzle_hopper_value,
)
from moeprep.schema.names import PREPARED_W2, PREPARED_W13

INTERMEDIATE_MULTIPLE = 64
HIDDEN_MULTIPLE = 1
NUM_WARPS = 8
# With LoRA on, vLLM 0.26 skips its fused Triton kernel (no LoRA support) for Marlin, whose layout this is not;
# its unfused Triton kernel reads the same layouts and applies MoE LoRA.
LORA_SERVE_FLAGS = ("--moe-backend", "triton_unfused")
# Seen on an H200: vLLM 0.34's LoRA MoE wrapper (FusedMoEModularMethod.apply) hands the unfused Triton kernel the
# raw weight parameter instead of its Triton tensor, and fails there, for the original gpt-oss too.
LORA_NOTE = (
    "vLLM 0.34's MoE LoRA fails on the unfused Triton kernel (its LoRA wrapper passes the raw weight; the original "
    "gpt-oss too); vLLM 0.26 serves it, and on vLLM 0.34 an adapter split for a --backend marlin base serves"
)
# triton_kernels (bundled with vLLM) and _swizzle_mxfp4's Hopper/Blackwell parts are the same code in 0.26.0-0.34.0
VLLM_RANGES = (("0.26.0", "0.34.0"),)


def _value(param: str, source: str, rows: int, k: int, dims: Mxfp4ExpertDims, arch: str) -> PreparedExpertTensor:
    """Values: vLLM holds the transposed view (``.mT``) of the stored bytes on both arches."""
    storage_shape, swizzle = (
        (hopper_value_storage_shape, swizzle_hopper_value)
        if arch == "sm90"
        else (blackwell_value_storage_shape, swizzle_blackwell_value)
    )
    storage = storage_shape(dims.experts, rows, k // 2)
    view_shape, view_strides = transposed_view(storage)

    def transform(blocks: torch.Tensor) -> torch.Tensor:
        return swizzle(pad_to(packed_blocks(blocks), (blocks.shape[0], rows, k // 2)))

    return PreparedExpertTensor(
        param, source, "U8", storage, view_shape, view_strides, f"triton-{arch}-value", transform
    )


def _scale(param: str, source: str, rows: int, k: int, dims: Mxfp4ExpertDims, arch: str) -> PreparedExpertTensor:
    """Scales: transposed view on sm90; the 5-D tiled storage itself on sm100."""
    groups = k // MXFP4_BLOCK
    if arch == "sm90":
        storage = hopper_scale_storage_shape(dims.experts, rows, groups, NUM_WARPS)
        view_shape, view_strides = transposed_view(storage)
        swizzle = lambda scales: swizzle_hopper_scale(scales, NUM_WARPS)  # noqa: E731
    else:
        storage = blackwell_scale_storage_shape(dims.experts, rows, groups)
        view_shape, view_strides, swizzle = storage, contiguous_strides(storage), swizzle_blackwell_scale

    def transform(scales: torch.Tensor) -> torch.Tensor:
        return swizzle(pad_to(scales, (scales.shape[0], rows, groups)))

    return PreparedExpertTensor(
        param, source, "U8", storage, view_shape, view_strides, f"triton-{arch}-scale", transform
    )


def _bias(param: str, source: str, rows: int, dims: Mxfp4ExpertDims) -> PreparedExpertTensor:
    shape = (dims.experts, rows)

    def transform(bias: torch.Tensor) -> torch.Tensor:
        return pad_to(bias, (bias.shape[0], rows)).to(torch.float32)

    return PreparedExpertTensor(param, source, "F32", shape, shape, contiguous_strides(shape), "pad-float32", transform)


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    """w13 = gate_up (rows 2*I', reduction H'), w2 = down (rows H', reduction I')."""
    w13_rows, w2_rows = 2 * dims.intermediate_padded, dims.hidden_padded
    return [
        _value(f"{PREPARED_W13}_value", "gate_up_proj_blocks", w13_rows, dims.hidden_padded, dims, arch),
        _scale(f"{PREPARED_W13}_scale", "gate_up_proj_scales", w13_rows, dims.hidden_padded, dims, arch),
        _bias(f"{PREPARED_W13}_bias", "gate_up_proj_bias", w13_rows, dims),
        _value(f"{PREPARED_W2}_value", "down_proj_blocks", w2_rows, dims.intermediate_padded, dims, arch),
        _scale(f"{PREPARED_W2}_scale", "down_proj_scales", w2_rows, dims.intermediate_padded, dims, arch),
        _bias(f"{PREPARED_W2}_bias", "down_proj_bias", w2_rows, dims),
    ]


BACKEND = register(
    LayoutBackend(
        name="triton",
        arches=("sm90", "sm100"),
        platform="cuda",
        recipe_version=1,
        padding=same_padding(("sm90", "sm100"), VLLM_RANGES, (HIDDEN_MULTIPLE, INTERMEDIATE_MULTIPLE)),
        prepared_expert_tensors=prepared_expert_tensors,
        knobs={"num_warps": NUM_WARPS},
        serve_flags=(),  # vLLM picks this kernel by default on Hopper
        lora_serve_flags=LORA_SERVE_FLAGS,
        lora_note=LORA_NOTE,
    )
)
