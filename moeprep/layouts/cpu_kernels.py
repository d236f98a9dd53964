"""Fused single-pass CPU kernels (numba, parallel, GIL released) for layouts whose torch formulation
needs several full passes over the data. Each one is tested bitwise against its torch formulation
and the reference transform."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(inline="always")
def _byte_or_zero(src: np.ndarray, e: int, row: int, col: int) -> int:  # pragma: no cover
    rows, k_bytes = src.shape[1], src.shape[2]
    return src[e, row, col] if row < rows and col < k_bytes else 0


@numba.njit(parallel=True, nogil=True, cache=True)
def hopper_value_words(src: np.ndarray, out: np.ndarray, twiddle: np.ndarray) -> None:  # pragma: no cover
    """``out`` [E, N'/4, K'/2] u32 words of the Hopper value layout from ``src`` [E, N, K/2] u8, with the
    zero padding (N to N', K/2 to K'/2 bytes) applied on the fly. Index map as in
    ``triton_hopper.swizzle_hopper_value``; ``twiddle`` [4, 256] u32 holds each group byte's bits by its
    place in the group (``triton_hopper.TWIDDLE_BY_BYTE``), 4 KiB that stay in L1."""
    experts, rows, k_bytes = src.shape
    out_rows, groups = out.shape[1], out.shape[2]
    for task in numba.prange(experts * out_rows):
        e, r = task // out_rows, task % out_rows
        r0, t0 = r // 4, r % 4
        for s0 in range(2):
            row_a = r0 * 16 + t0 * 2 + s0  # w0 = 0; w0 = 1 is 8 rows further
            row_b = row_a + 8
            rows_inside = row_b < rows
            for r1 in range(groups // 32):
                inside = rows_inside and r1 * 32 + 32 <= k_bytes
                for t1 in range(4):
                    g = r1 * 32 + s0 * 16 + t1 * 4
                    for k1 in range(4):
                        col_a = r1 * 32 + k1 * 8 + t1  # w1 = 0; w1 = 1 is 4 bytes further
                        if inside:
                            b00, b01 = src[e, row_a, col_a], src[e, row_b, col_a]
                            b10, b11 = src[e, row_a, col_a + 4], src[e, row_b, col_a + 4]
                        else:
                            b00 = _byte_or_zero(src, e, row_a, col_a)
                            b01 = _byte_or_zero(src, e, row_b, col_a)
                            b10 = _byte_or_zero(src, e, row_a, col_a + 4)
                            b11 = _byte_or_zero(src, e, row_b, col_a + 4)
                        word = twiddle[0, b00] | twiddle[1, b01] | twiddle[2, b10] | twiddle[3, b11]
                        out[e, r, g + k1] = word
