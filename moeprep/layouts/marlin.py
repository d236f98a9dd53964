"""Marlin mxfp4 MoE layout (bf16 activations), as vLLM 0.26's ``prepare_moe_mxfp4_layer_for_marlin``.

Source of truth: vllm/model_executor/layers/quantization/utils/marlin_utils_fp4.py and
marlin_utils.py: per expert, ``ops.gptq_marlin_repack`` of the weight viewed as GPTQ int32
(8 e2m1 nibbles along K per word), ``marlin_permute_scales`` + ``mxfp4_marlin_process_scales`` of
the e8m0 scales, ``marlin_permute_bias`` of the bf16 biases. vLLM pads the intermediate size to 128
and the hidden size to 256 for Marlin.
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

TILE = 16


def _weight_perm() -> torch.Tensor:
    """The 1024-entry permutation of a 16x64 Marlin tile row for 4-bit weights (mma fragment order)."""
    perm: list[int] = []
    for i in range(32):
        col = i // 4
        fragment = [
            16 * row + col + 8 * block
            for block in (0, 1)
            for row in (2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1)
        ]
        for j in range(4):
            perm.extend(p + 256 * j for p in fragment)
    interleave = [0, 2, 4, 6, 1, 3, 5, 7]  # 4-bit values are packed in this order within a word
    return torch.tensor(perm).reshape(-1, 8)[:, interleave].reshape(-1)


def _scale_perms() -> tuple[torch.Tensor, torch.Tensor]:
    grouped = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return torch.tensor(grouped), torch.tensor(single)


WEIGHT_PERM = _weight_perm()
SCALE_PERM, SCALE_PERM_SINGLE = _scale_perms()


def repack_marlin_weight(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, K/2] u8 (two e2m1 per byte, low nibble first) -> [E, K/16, 2N] int32 Marlin tiles."""
    experts, n, k_bytes = blocks.shape
    k = 2 * k_bytes
    if n % 64 or k % TILE:
        raise ValueError(f"Marlin needs N % 64 == 0 and K % 16 == 0, got N={n}, K={k}")
    nibbles = torch.stack((blocks & 0xF, blocks >> 4), dim=-1).reshape(experts, n, k).transpose(1, 2)  # [E, K, N]
    tiles = nibbles.reshape(experts, k // TILE, TILE, n // TILE, TILE).permute(0, 1, 3, 2, 4)
    tiles = tiles.reshape(experts, -1, WEIGHT_PERM.numel())[:, :, WEIGHT_PERM.to(blocks.device)]
    words = tiles.reshape(experts, k // TILE, n * TILE // 8, 8).to(torch.int64)
    packed = torch.zeros(words.shape[:-1], dtype=torch.int64, device=blocks.device)
    for i in range(8):
        packed |= words[..., i] << (4 * i)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def permute_marlin_scales(scales: torch.Tensor) -> torch.Tensor:
    """[E, N, K/32] u8 e8m0 -> [E, K/32, N] float8_e8m0fnu in Marlin order (bf16 activations)."""
    experts, n, groups = scales.shape
    s = scales.transpose(1, 2).reshape(experts, -1, SCALE_PERM.numel())[:, :, SCALE_PERM.to(scales.device)]
    s = s.reshape(experts, -1, 4)[:, :, [0, 2, 1, 3]]  # fp8-dequant-friendly order
    return s.reshape(experts, groups, n).contiguous().view(torch.float8_e8m0fnu)


def permute_marlin_bias(bias: torch.Tensor) -> torch.Tensor:
    """[E, N] -> [E, N] bf16, permuted within groups of 32 like the scales of one group."""
    experts, n = bias.shape
    perm = SCALE_PERM_SINGLE.to(bias.device)
    return bias.to(torch.bfloat16).reshape(experts, -1, perm.numel())[:, :, perm].reshape(experts, n).contiguous()


# Backend ``marlin`` (``moeprep convert --backend marlin``): vLLM 0.26 ``MarlinExperts`` for gpt-oss.
INTERMEDIATE_MULTIPLE = 128
HIDDEN_MULTIPLE = 256
# the repack is a CUDA op: each release whose op was recorded on a GPU (tests/golden/marlin)
VLLM_RANGES = (("0.26.0", "0.26.0"), ("0.34.0", "0.34.0"))
SERVE_FLAGS = ("--moe-backend", "marlin")  # vLLM picks Triton on Hopper unless told


def _projection(prefix: str, source: str, rows: int, k: int, experts: int) -> list[PreparedExpertTensor]:
    """Weight, scale and bias of one projection with ``rows`` outputs and reduction ``k`` (padded)."""
    return padded_projection(
        prefix,
        source,
        "marlin",
        rows,
        k,
        weight=("I32", (experts, k // TILE, 2 * rows), repack_marlin_weight),
        scale=("F8_E8M0", (experts, k // MXFP4_BLOCK, rows), permute_marlin_scales),
        bias=("BF16", (experts, rows), permute_marlin_bias),
    )


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str = "any") -> list[PreparedExpertTensor]:
    return gate_up_and_down(_projection, dims)


BACKEND = register(
    LayoutBackend(
        name="marlin",
        arches=("any",),  # one layout for every CUDA arch Marlin runs on
        platform="cuda",
        recipe_version=1,
        padding=same_padding(("any",), VLLM_RANGES, (HIDDEN_MULTIPLE, INTERMEDIATE_MULTIPLE)),
        prepared_expert_tensors=prepared_expert_tensors,
        serve_flags=SERVE_FLAGS,
        lora_serve_flags=SERVE_FLAGS,
    )
)
