"""``--backend auto``: the layout vLLM itself selects for a model on the machine it will serve on.

vLLM's mxfp4 MoE backend selection (0.26-0.34, ``fused_moe/oracle/mxfp4.py``): Triton ``matmul_ogs`` on Hopper,
FlashInfer TRT-LLM-Gen on datacenter Blackwell (sm100/sm103) where FlashInfer is installed, Marlin on other CUDA
GPUs, the AMX kernel on vLLM CPU with AMX (moeprep's ``cpu`` layout), and no kernel at all on vLLM CPU without AMX
(moeprep's ``dequant`` folders are served there by the plugin). Experts in other formats are loaded as stored:
backend ``none`` (``plan.auto_choice``). The target is ``--target-gpu`` or ``--arch`` when given, else this
machine's GPU, else this machine's CPU when vLLM CPU is installed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeprep.errors import UnsupportedModelError, option
from moeprep.schema.vllm_versions import installed_vllm

AUTO = "auto"
# GPUs by name, as people say them, and their CUDA architecture
GPU_ARCHES = {
    "a100": "sm80",
    "a10": "sm86",
    "a10g": "sm86",
    "l4": "sm89",
    "l40s": "sm89",
    "h100": "sm90",
    "h200": "sm90",
    "h20": "sm90",
    "gh200": "sm90",
    "b200": "sm100",
    "gb200": "sm100",
    "b300": "sm103",
    "gb300": "sm103",
}
TRTLLM_ARCHES = ("sm100", "sm103")


@dataclass(frozen=True)
class ServingTarget:
    """Where the folder will be served: ``cuda`` with a GPU ``arch`` (``sm90``), or ``cpu``; ``amx`` for CPUs
    with AMX tiles; ``described`` says how it was found, for people."""

    platform: str
    arch: str | None
    amx: bool
    described: str


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    arch: str | None
    reason: str


def serving_target(arch: str | None, target_gpu: str | None) -> ServingTarget:
    """The target named by ``--target-gpu`` / ``--arch``, else this machine's GPU or vLLM CPU."""
    if target_gpu is not None:
        key = target_gpu.lower().replace("-", "").replace(" ", "")
        if key not in GPU_ARCHES:
            raise UnsupportedModelError(
                f"{option('target_gpu', target_gpu)} is not known; choose one of: {', '.join(GPU_ARCHES)}"
            )
        return ServingTarget(
            "cuda", GPU_ARCHES[key], False, f"{target_gpu} ({GPU_ARCHES[key]}, {option('target_gpu')})"
        )
    if arch is not None:
        return ServingTarget("cuda", arch, False, f"{arch} ({option('arch')})")
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        found = f"sm{major}{minor}"
        return ServingTarget("cuda", found, False, f"this machine's {torch.cuda.get_device_name()} ({found})")
    installed = installed_vllm()
    if installed is not None and installed[1] == "cpu":
        amx = bool(torch.cpu._is_amx_tile_supported())  # the test vLLM CPU itself makes for its AMX kernel
        cpu = f"this machine's CPU with vLLM CPU {installed[0]}, {'with' if amx else 'without'} AMX"
        return ServingTarget("cpu", None, amx, cpu)
    raise UnsupportedModelError(
        f"{option('backend', 'auto')} needs to know where the folder will be served: pass {option('target_gpu')} "
        f"({', '.join(GPU_ARCHES)}) or {option('arch')}, or run on that machine; or pick {option('backend')} yourself"
    )


def choose_mxfp4(target: ServingTarget, trtllm_supported: bool) -> BackendChoice:
    """The backend vLLM's own selection leads to for mxfp4 experts on ``target`` (``trtllm_supported``: moeprep
    has a FlashInfer TRT-LLM recipe for the targeted vLLM)."""
    where = target.described
    if target.platform == "cpu":
        if target.amx:
            return BackendChoice("cpu", None, f"vLLM CPU runs mxfp4 MoE on its AMX kernel; target: {where}")
        return BackendChoice("dequant", None, f"vLLM CPU without AMX has no mxfp4 MoE kernel; target: {where}")
    arch = target.arch or ""
    if arch == "sm90":
        return BackendChoice(
            "triton", "sm90", f"vLLM runs mxfp4 MoE on Hopper through Triton matmul_ogs; target: {where}"
        )
    if arch in TRTLLM_ARCHES:
        if trtllm_supported:
            return BackendChoice(
                "flashinfer-trtllm",
                "sm100",
                f"vLLM runs mxfp4 MoE on Blackwell through FlashInfer TRT-LLM; target: {where}",
            )
        return BackendChoice(
            "none",
            "sm100",
            "vLLM runs mxfp4 MoE on Blackwell through FlashInfer TRT-LLM, whose layout moeprep has verified for "
            f"another vLLM only: padding only, vLLM's own transform runs at load; target: {where}",
        )
    return BackendChoice("marlin", "any", f"vLLM runs mxfp4 MoE on this GPU through Marlin; target: {where}")
