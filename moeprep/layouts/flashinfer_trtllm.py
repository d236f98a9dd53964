"""Backend ``flashinfer-trtllm``: gpt-oss mxfp4 experts as vLLM 0.26's FlashInfer TRT-LLM-Gen MoE
(``TrtLlmMxfp4Experts``, Blackwell sm100) holds them.

What vLLM does at load (vllm/model_executor/layers/fused_moe/oracle/mxfp4.py, ``TRTLLM_BACKENDS`` branch of
``convert_gpt_oss_weight_to_mxfp4_moe_kernel_format``, with flashinfer 0.6.14): hidden and intermediate
rounded up to 256, checkpoint tensors copied into the zero-padded parameters, biases cast to float32, then
per expert:
- w13 (gate/up rows interleaved): every pair of rows swapped (up before gate: TRT-LLM's SwiGLU order);
- every weight, scale and bias: rows reordered in blocks of 32 for the transposed MMA epilogue
  (``epilogue_tile_m=128``: row ``32b + 8j + q`` of the output is row ``32b + 4q + j`` of the input);
- scales: then ``block_scale_interleave``, the 128x4 swizzle of FP4 block scales (512-byte tiles of 128 rows
  x 4 scale columns, rows 32 apart side by side), held by vLLM as float8_e4m3fn bytes [E, N, K/32].
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

INTERMEDIATE_MULTIPLE = 256
HIDDEN_MULTIPLE = 256
EPILOGUE_TILE_M = 128
SERVE_FLAGS = ("--moe-backend", "flashinfer_trtllm")
# vLLM 0.27+ pads the intermediate size to 128 and pins newer flashinfer releases: not verified yet
VLLM_RANGES = (("0.26.0", "0.26.0"),)

SHUFFLE_BLOCK = 32  # rows per epilogue shuffle block when epilogue_tile_m is a multiple of 128
SF_TILE_ROWS, SF_TILE_COLS = 128, 4  # one 512-byte tile of the interleaved block scales


def epilogue_row_order(rows: int, swap_pairs: bool) -> torch.Tensor:
    """Gather index of the output rows: ``out[i] = in[order[i]]``, pair swap (w13) applied first."""
    if rows % SHUFFLE_BLOCK:
        raise ValueError(f"the TRT-LLM shuffle needs rows % {SHUFFLE_BLOCK} == 0, got {rows}")
    i = torch.arange(rows)
    order = i - i % SHUFFLE_BLOCK + (i % 8) * 4 + (i % SHUFFLE_BLOCK) // 8
    return order ^ 1 if swap_pairs else order


def interleave_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """[E, M, K] u8, M % 128 == 0 and K % 4 == 0 -> same shape, each expert's bytes in the 128x4 swizzle:
    byte ``(m, k)`` at ``((m // 128) * K/4 + k // 4) * 512 + (m % 32) * 16 + (m % 128 // 32) * 4 + k % 4``."""
    experts, rows, cols = scales.shape
    if rows % SF_TILE_ROWS or cols % SF_TILE_COLS:
        raise ValueError(f"block scale interleave needs [M % 128, K % 4] == 0, got {[rows, cols]}")
    tiles = scales.reshape(experts, rows // SF_TILE_ROWS, 4, 32, cols // SF_TILE_COLS, SF_TILE_COLS)
    return tiles.permute(0, 1, 4, 3, 2, 5).reshape(experts, rows, cols).contiguous()


def shuffle_rows(tensor: torch.Tensor, swap_pairs: bool) -> torch.Tensor:
    """Rows (dim 1) of every expert in TRT-LLM's epilogue order."""
    return tensor.index_select(1, epilogue_row_order(tensor.shape[1], swap_pairs).to(tensor.device))


def _projection(prefix: str, source: str, rows: int, k: int, experts: int) -> list[PreparedExpertTensor]:
    """Weight, scale and bias of one projection with ``rows`` outputs and reduction ``k`` (padded); gate_up
    rows come in (gate, up) pairs that TRT-LLM wants as (up, gate)."""
    swap = source == "gate_up_proj"
    return padded_projection(
        prefix,
        source,
        "flashinfer-trtllm",
        rows,
        k,
        weight=("U8", (experts, rows, k // 2), lambda blocks: shuffle_rows(blocks, swap)),
        scale=(
            "F8_E4M3",
            (experts, rows, k // MXFP4_BLOCK),
            lambda scales: interleave_block_scales(shuffle_rows(scales, swap)).view(torch.float8_e4m3fn),
        ),
        bias=("F32", (experts, rows), lambda bias: shuffle_rows(bias.to(torch.float32), swap)),
    )


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str = "sm100") -> list[PreparedExpertTensor]:
    return gate_up_and_down(_projection, dims)


BACKEND = register(
    LayoutBackend(
        name="flashinfer-trtllm",
        arches=("sm100",),
        platform="cuda",
        recipe_version=1,
        padding=same_padding(("sm100",), VLLM_RANGES, (HIDDEN_MULTIPLE, INTERMEDIATE_MULTIPLE)),
        prepared_expert_tensors=prepared_expert_tensors,
        knobs={"epilogue_tile_m": EPILOGUE_TILE_M},
        serve_flags=SERVE_FLAGS,
        lora_serve_flags=SERVE_FLAGS,
    )
)
