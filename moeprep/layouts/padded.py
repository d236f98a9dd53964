"""``--backend none`` for mxfp4 experts: padding only. The experts are written as vLLM's mxfp4
parameters hold them once its loader has filled them (``mxfp4_experts.loaded_parameters``), zero-padded to the
sizes of the kernel vLLM picks for gpt-oss on ``--arch``: sm90 Triton ``matmul_ogs`` (intermediate to 64), sm100
FlashInfer TRT-LLM (hidden to 256, intermediate to 256 in vLLM 0.26, 128 from 0.27). vLLM's own kernel transform
then runs at load.
"""

from __future__ import annotations

from moeprep.layouts import flashinfer_trtllm, triton
from moeprep.layouts.backend import PADDING_ONLY, LayoutBackend, register
from moeprep.layouts.mxfp4_experts import (
    Mxfp4ExpertDims,
    PreparedExpertTensor,
    gate_up_and_down,
    loaded_parameters,
)


def prepared_expert_tensors(dims: Mxfp4ExpertDims, arch: str) -> list[PreparedExpertTensor]:
    return gate_up_and_down(loaded_parameters("pad"), dims)


BACKEND = register(
    LayoutBackend(
        name=PADDING_ONLY,
        arches=("sm90", "sm100"),
        platform="cuda",
        recipe_version=1,
        # per arch: the (hidden, intermediate) multiples of the kernel vLLM picks there by default, per vLLM range
        padding={
            "sm90": ((("0.26.0", "0.34.0"), (triton.HIDDEN_MULTIPLE, triton.INTERMEDIATE_MULTIPLE)),),
            "sm100": (  # FlashInfer TRT-LLM: vLLM 0.27 pads the intermediate size to 128 instead of 256
                (("0.26.0", "0.26.0"), (flashinfer_trtllm.HIDDEN_MULTIPLE, flashinfer_trtllm.INTERMEDIATE_MULTIPLE)),
                (("0.27.0", "0.34.0"), (flashinfer_trtllm.HIDDEN_MULTIPLE, 128)),
            ),
        },
        prepared_expert_tensors=prepared_expert_tensors,
        lora_serve_flags=triton.LORA_SERVE_FLAGS,
        lora_note=triton.LORA_NOTE,
    )
)
