"""Seeded inputs for golden layout vectors (the seed, not the bytes, is committed)."""

from __future__ import annotations

import torch

# (experts, rows N, reduction K) incl. gpt-oss-20b/120b expert dims (2I=5760 x H=2880, H x I) and
# sizes that are not multiples of any padding.
TRITON_CASES = [
    {"seed": 1, "experts": 2, "rows": 5760, "k": 2880},
    {"seed": 2, "experts": 2, "rows": 2880, "k": 2880},
    {"seed": 3, "experts": 3, "rows": 200, "k": 192},
    {"seed": 4, "experts": 1, "rows": 300, "k": 1056},
    {"seed": 5, "experts": 4, "rows": 64, "k": 64},
    {"seed": 6, "experts": 2, "rows": 17, "k": 96},
]

# (seed, experts, intermediate n, hidden k), recorded from vLLM 0.26 on an H100 by scripts/make_golden_marlin.py
MARLIN_CASES = [(11, 2, 128, 256), (12, 3, 192, 192), (13, 2, 2880, 2880)]


def mxfp4_inputs(seed: int, experts: int, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 blocks [E, rows, k/2] and e8m0 scales [E, rows, k/32] (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 135, (experts, rows, k // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def marlin_inputs(seed: int, e: int, n: int, k: int) -> dict[str, torch.Tensor]:
    """Seeded inputs of vLLM's ``prepare_moe_mxfp4_layer_for_marlin`` (w13 = gate_up, w2 = down)."""
    gen = torch.Generator().manual_seed(seed)

    def u8(*shape: int, lo: int = 0, hi: int = 256) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.uint8)

    return {
        "w13": u8(e, 2 * n, k // 2),
        "w2": u8(e, k, n // 2),
        "w13_scale": u8(e, 2 * n, k // 32, lo=110, hi=135),
        "w2_scale": u8(e, k, n // 32, lo=110, hi=135),
        "w13_bias": torch.randn(e, 2 * n, generator=gen).to(torch.bfloat16),
        "w2_bias": torch.randn(e, k, generator=gen).to(torch.bfloat16),
    }
