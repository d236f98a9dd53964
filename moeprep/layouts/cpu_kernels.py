"""Fused single-pass CPU kernels (numba, parallel, GIL released) for layouts whose torch formulation
needs several full passes over the data. Each one is tested bitwise against its torch formulation
and the reference transform."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True)
def hopper_value_words(src: np.ndarray, out: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:  # pragma: no cover
    """``out`` [E, N'/4, K'/2] u32 words of the Hopper value layout from ``src`` [E, N, K/2] u8, with the
    zero padding (N to N', K/2 to K'/2 bytes) applied on the fly. Index map as in
    ``triton_hopper.swizzle_hopper_value``; ``lo``/``hi`` are its 16-bit twiddle tables."""
    experts, rows, k_bytes = src.shape
    out_rows, groups = out.shape[1], out.shape[2]
    for task in numba.prange(experts * out_rows):
        e, r = task // out_rows, task % out_rows
        r0, t0 = r // 4, r % 4
        for g in range(groups):
            r1, s0, t1, k1 = g // 32, (g // 16) % 2, (g // 4) % 4, g % 4
            row_a = r0 * 16 + t0 * 2 + s0  # w0 = 0; w0 = 1 is 8 rows further
            row_b = row_a + 8
            col_a = r1 * 32 + k1 * 8 + t1  # w1 = 0; w1 = 1 is 4 bytes further
            col_b = col_a + 4
            b00 = src[e, row_a, col_a] if row_a < rows and col_a < k_bytes else 0
            b01 = src[e, row_b, col_a] if row_b < rows and col_a < k_bytes else 0
            b10 = src[e, row_a, col_b] if row_a < rows and col_b < k_bytes else 0
            b11 = src[e, row_b, col_b] if row_b < rows and col_b < k_bytes else 0
            out[e, r, g] = lo[np.int64(b00) | (np.int64(b01) << 8)] | hi[np.int64(b10) | (np.int64(b11) << 8)]
