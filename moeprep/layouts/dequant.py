"""Backend ``dequant``: gpt-oss mxfp4 experts as vLLM's mxfp4 parameters hold them before any kernel
transform, for the moeprep runtime's per-expert dequantizing MoE (vLLM CPU has no mxfp4 MoE kernel
without AMX).

``w13``/``w2`` values are the checkpoint's packed e2m1 bytes [E, N, K/2] (gate/up rows interleaved),
scales its e8m0 bytes [E, N, K/32], biases bf16 [E, N]; nothing is padded.
"""

from __future__ import annotations

import torch

from moeprep.layouts.mxfp4_experts import (
    MXFP4_BLOCK,
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    contiguous_projection,
    gate_up_and_down,
    packed_blocks,
)

NAME = "dequant"
ARCHES = ("any",)
INTERMEDIATE_MULTIPLE = 1
HIDDEN_MULTIPLE = 1
KNOBS: dict[str, int] = {}
RECIPE_VERSION = 1
SERVE_FLAGS: tuple[str, ...] = ()
LORA_SERVE_FLAGS = SERVE_FLAGS
VERIFIED_VLLM = ["0.32.0"]
EXPERTS_MODULE = "mlp.experts.routed_experts"


def _projection(prefix: str, source: str, rows: int, k: int, experts: int) -> list[PreparedExpertTensor]:
    """Weight, scale and bias of one projection with ``rows`` outputs and reduction ``k``: the checkpoint's bytes."""
    keep = torch.Tensor.contiguous
    return contiguous_projection(
        prefix,
        source,
        "dequant",
        [
            ("weight", "blocks", "U8", (experts, rows, k // 2), packed_blocks),
            ("scale", "scales", "U8", (experts, rows, k // MXFP4_BLOCK), keep),
            ("bias", "bias", "BF16", (experts, rows), keep),
        ],
    )


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    return gate_up_and_down(_projection, dims)
