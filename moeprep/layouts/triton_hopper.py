"""triton_kernels ``matmul_ogs`` mxfp4 weight layouts for Hopper (sm90), as vLLM 0.26 builds them.

Source of truth: ``triton_kernels/tensor_details/layout_details/hopper_{value,scale}.py`` vendored in
vLLM 0.26.0 (``HopperMXValueLayout(mx_axis=1)``, ``HopperMXScaleLayout(mx_axis=1, num_warps=8)``),
applied by ``vllm/model_executor/layers/quantization/utils/mxfp4_utils.py::_swizzle_mxfp4`` to
``w13_weight``/``w2_weight`` [E, N, K/2] (u8, two e2m1 per byte, K the reduction dim) and their
e8m0 scales [E, N, K/32], after vLLM pads the scale K dim to a multiple of 4 on Hopper.

Both functions return the *contiguous storage* of the tensor vLLM holds; vLLM views it transposed
(``.mT``), which the manifest records as strides.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moeprep.layouts.padding import pad_to, round_up

VALUE_ROW_MULTIPLE = 16  # rows: warp_tile 2 x threads 4 x "scott trick" 2
VALUE_BYTE_MULTIPLE = 32  # K bytes: k_tile 4 x warp_tile 2 x threads 4
SCALE_K_MULTIPLE_SM90 = 4  # vLLM 0.26 pads scale groups to 0 mod 4 on Hopper (vLLM PR #47303)


def _fp4_bits(nibble: torch.Tensor) -> torch.Tensor:
    """e2m1 nibble -> its sign/exponent/mantissa placed as in a bf16 (sign bit 15, e/m bits 6..8)."""
    return ((nibble & 0x8) << 12) | ((nibble & 0x7) << 6)


def _fp4_bits_fourth(nibble: torch.Tensor) -> torch.Tensor:
    """The fourth value of a group fills the bits the other three leave free (bits 9..10, 13, 14)."""
    return ((nibble & 0x8) << 11) | ((nibble & 0x6) << 9) | ((nibble & 0x1) << 13)


def _byte_bits(byte: torch.Tensor, nibble_bits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return nibble_bits(byte & 0xF) | (nibble_bits(byte >> 4) << 16)


def _build_twiddle_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables over 16-bit halves: a packed 4-byte group (b0, b1, b2, b3) becomes the int32
    ``LO[b0 | b1 << 8] | HI[b2 | b3 << 8]``, where byte i contributes its bf16-positioned bits
    shifted right (logically) by 0, 3, 6 bits, and byte 3 fills the remaining bits."""
    half = torch.arange(1 << 16, dtype=torch.int64)
    first, second = half & 0xFF, half >> 8
    lo = _byte_bits(first, _fp4_bits) | (_byte_bits(second, _fp4_bits) >> 3)
    hi = (_byte_bits(first, _fp4_bits) >> 6) | _byte_bits(second, _fp4_bits_fourth)
    return _as_int32(lo), _as_int32(hi)


def _as_int32(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret the low 32 bits of int64 values as int32 (two's complement)."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)


_TWIDDLE_LO, _TWIDDLE_HI = _build_twiddle_tables()
# The same twiddle per byte of a group (b0, b1, b2, b3): word = T[0][b0] | T[1][b1] | T[2][b2] | T[3][b3].
_BYTES = torch.arange(256, dtype=torch.int64)
TWIDDLE_BY_BYTE = (
    torch.stack([_TWIDDLE_LO[_BYTES], _TWIDDLE_LO[_BYTES << 8], _TWIDDLE_HI[_BYTES], _TWIDDLE_HI[_BYTES << 8]])
    .numpy()
    .view(np.uint32)
)


def hopper_value_storage_shape(experts: int, rows: int, k_bytes: int) -> tuple[int, int, int]:
    padded_rows, padded_bytes = round_up(rows, VALUE_ROW_MULTIPLE), round_up(k_bytes, VALUE_BYTE_MULTIPLE)
    return experts, padded_rows // 4, padded_bytes * 4


def swizzle_hopper_value(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, K/2] u8 packed e2m1 -> contiguous [E, N'/4, 4*K'/2] u8 (N' = N to 16, K'/2 to 32 bytes).

    Output row ``r0*4 + t0`` and 4-byte group ``r1*32 + s0*16 + t1*4 + k1`` gather, for
    ``(w1, w0)`` in (0,0), (0,1), (1,0), (1,1), the input byte at row ``r0*16 + w0*8 + t0*2 + s0``,
    column ``r1*32 + k1*8 + w1*4 + t1``; each group's bits are then twiddled for fast bf16 upcast.
    On CPU a fused single-pass kernel computes the same bytes (``cpu_kernels.hopper_value_words``).
    """
    if blocks.device.type == "cpu":
        return swizzle_hopper_value_fused(blocks)
    return swizzle_hopper_value_torch(blocks)


def swizzle_hopper_value_fused(blocks: torch.Tensor) -> torch.Tensor:
    """``swizzle_hopper_value`` on CPU in one pass (padding, gather and twiddle fused)."""
    from moeprep.layouts.cpu_kernels import hopper_value_words

    shape = hopper_value_storage_shape(*blocks.shape)
    out = torch.empty(shape, dtype=torch.uint8)
    words = out.view(torch.int32).numpy().view(np.uint32)
    hopper_value_words(blocks.contiguous().numpy(), words, TWIDDLE_BY_BYTE)
    return out


def swizzle_hopper_value_torch(blocks: torch.Tensor) -> torch.Tensor:
    """``swizzle_hopper_value`` as torch ops on any device (several passes; used on GPU)."""
    experts, rows, k_bytes = blocks.shape
    shape = hopper_value_storage_shape(experts, rows, k_bytes)
    padded = pad_to(blocks, (experts, shape[1] * 4, shape[2] // 4))
    r0, r1 = padded.shape[1] // 16, padded.shape[2] // 32
    # axes: E, r0, w0, t0, s0, r1, k1, w1, t1  ->  E, r0, t0, r1, s0, t1, k1, w1, w0
    grouped = padded.view(experts, r0, 2, 4, 2, r1, 4, 2, 4).permute(0, 1, 3, 5, 4, 8, 6, 7, 2)
    halves = grouped.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    halves = halves.view(-1, 2)
    words = _TWIDDLE_LO.to(blocks.device)[halves[:, 0]] | _TWIDDLE_HI.to(blocks.device)[halves[:, 1]]
    return words.view(torch.uint8).view(shape)


def hopper_scale_storage_shape(experts: int, rows: int, k_groups: int, num_warps: int = 8) -> tuple[int, int, int]:
    padded_rows = round_up(rows, 2 * num_warps * 2 * 8)
    padded_k = round_up(round_up(k_groups, SCALE_K_MULTIPLE_SM90), 2)
    return experts, padded_rows // 32, padded_k * 32


def swizzle_hopper_scale(scales: torch.Tensor, num_warps: int = 8) -> torch.Tensor:
    """[E, N, K/32] u8 e8m0 -> contiguous [E, N'/32, 32*K''] u8 (N' = N to 32*num_warps, K'' = K/32 to 4).

    Output row ``R*num_warps + b``, column ``e*64 + a*32 + d*4 + f*2 + c`` take the input scale at
    row ``R*32*num_warps + a*16*num_warps + b*16 + c*8 + d``, group ``e*2 + f``.
    """
    if num_warps <= 0 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")
    experts, rows, k_groups = scales.shape
    shape = hopper_scale_storage_shape(experts, rows, k_groups, num_warps)
    padded_k = shape[2] // 32
    padded = pad_to(scales, (experts, shape[1] * 32, padded_k))
    big = padded.shape[1] // (32 * num_warps)
    # axes: E, R, a, b, c, d, e, f  ->  E, R, b, e, a, d, f, c
    view = padded.view(experts, big, 2, num_warps, 2, 8, padded_k // 2, 2).permute(0, 1, 3, 6, 2, 5, 7, 4)
    return view.contiguous().view(shape)
