"""Backend ``cpu``: gpt-oss mxfp4 experts as vLLM CPU 0.32's AMX kernel (``CPUExpertsMxfp4``) holds them.

Source of truth: vllm/model_executor/layers/fused_moe/oracle/mxfp4.py (``Mxfp4MoeBackend.CPU``: hidden and
intermediate rounded up to 32, checkpoint tensors copied into the zero-padded parameters, biases cast to
float32) and experts/cpu_moe.py ``prepare_mxfp4_moe_layer_for_cpu``: ``torch.ops._C.convert_weight_packed``
and ``convert_scale_packed``. Both work on blocks of 32 output rows (the kernel's BLOCK_N):
- weights: each byte pairs one e2m1 value of row r (low nibble) with the same column of row r + 16;
  bytes run over column pairs, then the 16 row pairs, then the two columns of the pair;
- scales: the [32, K/32] block is transposed, so the 32 rows of one scale group are contiguous.
"""

from __future__ import annotations

import torch

from moeprep.layouts.backend import LayoutBackend, register, same_padding
from moeprep.layouts.mxfp4_experts import (
    MXFP4_BLOCK,
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    gate_up_and_down,
    padded_projection,
)

BLOCK_N = 32
VLLM_RANGES = (("0.32.0", "0.32.0"),)  # the newest CPU build; its op recorded in tests/golden/cpu_amx


def pack_cpu_weight(weight: torch.Tensor) -> torch.Tensor:
    """[E, N, K/2] u8 (two e2m1 per byte, low nibble first), N a multiple of 32 -> the packed [E, N, K/2]."""
    experts, rows, half_k = weight.shape
    blocks = weight.reshape(experts, rows // BLOCK_N, 2, BLOCK_N // 2, half_k)
    first, second = blocks[:, :, 0], blocks[:, :, 1]  # rows r and r + 16 of each block
    even_columns = (first & 0x0F) | ((second & 0x0F) << 4)
    odd_columns = (first >> 4) | (second & 0xF0)
    packed = torch.stack((even_columns, odd_columns), dim=-1)  # [E, blocks, 16, K/2, 2]
    return packed.permute(0, 1, 3, 2, 4).reshape(experts, rows, half_k).contiguous()


def pack_cpu_scale(scale: torch.Tensor) -> torch.Tensor:
    """[E, N, K/32] u8 e8m0, N a multiple of 32 -> each 32-row block transposed, same shape."""
    experts, rows, groups = scale.shape
    blocks = scale.reshape(experts, rows // BLOCK_N, BLOCK_N, groups)
    return blocks.transpose(-1, -2).reshape(experts, rows, groups).contiguous()


def _projection(prefix: str, source: str, rows: int, k: int, experts: int) -> list[PreparedExpertTensor]:
    """Weight, scale and bias of one projection with ``rows`` outputs and reduction ``k`` (padded)."""
    return padded_projection(
        prefix,
        source,
        "cpu",
        rows,
        k,
        weight=("U8", (experts, rows, k // 2), pack_cpu_weight),
        scale=("U8", (experts, rows, k // MXFP4_BLOCK), pack_cpu_scale),
        bias=("F32", (experts, rows), lambda bias: bias.to(torch.float32)),
    )


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str = "any") -> list[PreparedExpertTensor]:
    return gate_up_and_down(_projection, dims)


BACKEND = register(
    LayoutBackend(
        name="cpu",
        arches=("any",),  # x86 with AMX: the only CPUs vLLM runs this kernel on
        platform="cpu",
        recipe_version=1,
        padding=same_padding(("any",), VLLM_RANGES, (BLOCK_N, BLOCK_N)),
        prepared_expert_tensors=prepared_expert_tensors,
    )
)
