"""``--backend none`` for mxfp4 experts: padding only. The experts are written as vLLM 0.26's mxfp4
parameters hold them once its loader has filled them (``mxfp4_experts.loaded_parameters``), zero-padded to the
sizes of the kernel vLLM picks for gpt-oss on ``--arch``: sm90 Triton ``matmul_ogs`` (intermediate to 64), sm100
FlashInfer TRT-LLM (hidden and intermediate to 256). vLLM's own kernel transform then runs at load.
"""

from __future__ import annotations

from moeprep.layouts import flashinfer_trtllm, triton
from moeprep.layouts.mxfp4_experts import (
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    gate_up_and_down,
    loaded_parameters,
)

NAME = "none"
ARCHES = ("sm90", "sm100")
# arch -> (hidden, intermediate) multiples of the kernel vLLM 0.26 picks there by default
ARCH_PADDING = {
    "sm90": (triton.HIDDEN_MULTIPLE, triton.INTERMEDIATE_MULTIPLE),
    "sm100": (flashinfer_trtllm.HIDDEN_MULTIPLE, flashinfer_trtllm.INTERMEDIATE_MULTIPLE),
}
KNOBS: dict[str, int] = {}
RECIPE_VERSION = 1
SERVE_FLAGS: tuple[str, ...] = ()
LORA_SERVE_FLAGS = triton.LORA_SERVE_FLAGS
VERIFIED_VLLM = ["0.26.0"]
EXPERTS_MODULE = "mlp.experts.routed_experts"


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    return gate_up_and_down(loaded_parameters("pad"), dims)
