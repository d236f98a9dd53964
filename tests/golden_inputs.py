"""Seeded inputs for golden layout vectors (the seed, not the bytes, is committed)."""

from __future__ import annotations

import torch

# (experts, rows N, reduction K) incl. gpt-oss-20b/120b expert dims (2I=5760 x H=2880, H x I) and
# sizes that are not multiples of any padding.
TRITON_HOPPER_CASES = [
    {"seed": 1, "experts": 2, "rows": 5760, "k": 2880},
    {"seed": 2, "experts": 2, "rows": 2880, "k": 2880},
    {"seed": 3, "experts": 3, "rows": 200, "k": 192},
    {"seed": 4, "experts": 1, "rows": 300, "k": 1056},
    {"seed": 5, "experts": 4, "rows": 64, "k": 64},
    {"seed": 6, "experts": 2, "rows": 17, "k": 96},
]


def mxfp4_inputs(seed: int, experts: int, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 blocks [E, rows, k/2] and e8m0 scales [E, rows, k/32] (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 135, (experts, rows, k // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales
