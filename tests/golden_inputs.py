"""Seeded inputs for golden layout vectors (the seed, not the bytes, is committed)."""

from __future__ import annotations

import torch

from moeprep.layout_check import gpt_oss_expert_tensors

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

# (seed, experts, rows N, reduction K) of the CPU AMX pack (recorded by scripts/make_golden_cpu_amx.py): gpt-oss-20b
# w13 and w2, and small sizes that are not multiples of its 32-row blocks (zero-padded to 32 as vLLM does)
CPU_AMX_CASES = [(31, 2, 5760, 2880), (32, 2, 2880, 2880), (33, 3, 384, 192), (34, 2, 200, 320), (35, 1, 40, 64)]
CPU_AMX_WHOLE_CASE_BYTES = 3 * 384 * 96  # cases up to this many (padded) weight bytes are stored whole

# (seed, experts, intermediate n, hidden k), recorded from vLLM 0.26 on an H100 by scripts/make_golden_marlin.py
MARLIN_CASES = [(11, 2, 128, 256), (12, 3, 192, 192), (13, 2, 2880, 2880)]


def mxfp4_inputs(seed: int, experts: int, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed e2m1 blocks [E, rows, k/2] and e8m0 scales [E, rows, k/32] (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 135, (experts, rows, k // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def cpu_amx_inputs(seed: int, experts: int, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM CPU's mxfp4 expert parameters after loading: random blocks [E, N, K/2] and scales [E, N, K/32] in the
    leading corner of zeros whose N and K are rounded up to 32 (the inputs of ``prepare_mxfp4_moe_layer_for_cpu``)."""
    blocks, scales = mxfp4_inputs(seed, experts, rows, k)
    rows_padded, k_padded = -(-rows // 32) * 32, -(-k // 32) * 32
    weight = torch.zeros(experts, rows_padded, k_padded // 2, dtype=torch.uint8)
    scale = torch.zeros(experts, rows_padded, k_padded // 32, dtype=torch.uint8)
    weight[:, :rows, : k // 2] = blocks
    scale[:, :rows, : k // 32] = scales
    return weight, scale


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


# (seed, experts, hidden, intermediate) of the flashinfer-trtllm golden hashes
# (recorded by scripts/make_golden_flashinfer_trtllm.py)
TRTLLM_CASES = [(21, 2, 2880, 2880), (22, 3, 192, 96), (23, 2, 512, 768)]


gpt_oss_expert_inputs = gpt_oss_expert_tensors  # the layer moeprep's load-time check draws


def vllm_padded_params(
    inputs: dict[str, torch.Tensor], hidden: int, inter: int, hidden_multiple: int, inter_multiple: int
) -> tuple[torch.Tensor, ...]:
    """vLLM's mxfp4 expert parameters after loading: zeros of the padded sizes with the checkpoint's bytes
    in their leading corner. ``(w13, w2, w13_scale, w2_scale, w13_bias, w2_bias)``."""
    h = -(-hidden // hidden_multiple) * hidden_multiple
    i = -(-inter // inter_multiple) * inter_multiple

    def param(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        value = inputs[name]
        value = value.reshape(*value.shape[:2], -1) if name.endswith("blocks") else value
        out = torch.zeros(shape, dtype=dtype)
        out[tuple(slice(0, d) for d in value.shape)] = value
        return out

    e = inputs["gate_up_proj_blocks"].shape[0]
    return (
        param("gate_up_proj_blocks", (e, 2 * i, h // 2), torch.uint8),
        param("down_proj_blocks", (e, h, i // 2), torch.uint8),
        param("gate_up_proj_scales", (e, 2 * i, h // 32), torch.uint8),
        param("down_proj_scales", (e, h, i // 32), torch.uint8),
        param("gate_up_proj_bias", (e, 2 * i), torch.bfloat16),
        param("down_proj_bias", (e, h), torch.bfloat16),
    )
