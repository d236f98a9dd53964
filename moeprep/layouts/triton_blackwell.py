"""triton_kernels ``matmul_ogs`` mxfp4 weight layouts for Blackwell (sm100), as vLLM 0.26 builds them.

Source of truth: ``triton_kernels/tensor_details/layout_details/blackwell_{value,scale}.py`` vendored in
vLLM 0.26.0, applied by ``_swizzle_mxfp4`` (no scale K padding on sm100). Both functions return the
contiguous storage of the tensor vLLM holds.
"""

from __future__ import annotations

import torch

from moeprep.layouts.padding import pad_to, round_up

VALUE_BYTE_MULTIPLE = 128  # the contiguous (K) dim is padded to 128 bytes
SCALE_N_MULTIPLE = 128
SCALE_K_MULTIPLE = 8


def blackwell_value_storage_shape(experts: int, rows: int, k_bytes: int) -> tuple[int, int, int]:
    return experts, rows, round_up(k_bytes, VALUE_BYTE_MULTIPLE)


def swizzle_blackwell_value(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, K/2] u8 -> [E, N, K'/2] u8: the bytes unchanged, K/2 zero-padded to 128 (vLLM holds the ``.mT``)."""
    return pad_to(blocks, blackwell_value_storage_shape(*blocks.shape)).contiguous()


def blackwell_scale_storage_shape(experts: int, rows: int, k_groups: int) -> tuple[int, int, int, int, int]:
    n_pad, k_pad = round_up(rows, SCALE_N_MULTIPLE), round_up(k_groups, SCALE_K_MULTIPLE)
    return 1, experts * n_pad // 128, k_pad // 4, 2, 256


def swizzle_blackwell_scale(scales: torch.Tensor) -> torch.Tensor:
    """[E, N, K/32] u8 e8m0 -> [1, E*N'/128, K'/4, 2, 256] u8 (N' = N to 128, K' = K/32 to 8).

    Within each 128-row tile, 4-group chunk ``k4`` of rows ``n = 32*a + b`` (a < 4, b < 32) lands at
    ``[tile, k4, b, a, k % 4]``."""
    experts, rows, k_groups = scales.shape
    shape = blackwell_scale_storage_shape(experts, rows, k_groups)
    n_pad, k_pad = shape[1] * 128 // experts, shape[2] * 4
    padded = pad_to(scales, (experts, n_pad, k_pad))
    tiles = padded.reshape(experts, n_pad // 128, 4, 32, k_pad // 4, 4).transpose(2, 4)
    return tiles.contiguous().view(shape)
