"""``--backend none`` for mxfp4 experts: padding only. The experts are written as vLLM's mxfp4
parameters hold them once its loader has filled them (``mxfp4_experts.loaded_parameters``), zero-padded to the
sizes of the kernel vLLM picks for gpt-oss on ``--arch``: sm90 Triton ``matmul_ogs`` (intermediate to 64), sm100
FlashInfer TRT-LLM (hidden to 256, intermediate to 256 in vLLM 0.26, 128 from 0.27). vLLM's own kernel transform
then runs at load.
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
# arch -> (vLLM range, (hidden, intermediate) multiples of the kernel vLLM picks there by default) per range
ARCH_PADDING_BY_VLLM = {
    "sm90": ((("0.26.0", "0.34.0"), (triton.HIDDEN_MULTIPLE, triton.INTERMEDIATE_MULTIPLE)),),
    "sm100": (  # FlashInfer TRT-LLM: vLLM 0.27 pads the intermediate size to 128 instead of 256
        (("0.26.0", "0.26.0"), (flashinfer_trtllm.HIDDEN_MULTIPLE, flashinfer_trtllm.INTERMEDIATE_MULTIPLE)),
        (("0.27.0", "0.34.0"), (flashinfer_trtllm.HIDDEN_MULTIPLE, 128)),
    ),
}
KNOBS: dict[str, int] = {}
RECIPE_VERSION = 1
SERVE_FLAGS: tuple[str, ...] = ()
LORA_SERVE_FLAGS = triton.LORA_SERVE_FLAGS
LORA_NOTE = triton.LORA_NOTE
PLATFORM = "cuda"
VLLM_RANGES = (("0.26.0", "0.34.0"),)
EXPERTS_MODULE = "mlp.experts.routed_experts"


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    return gate_up_and_down(loaded_parameters("pad"), dims)
