"""Prove a layout recipe against the vLLM installed here: vLLM's own weight transform of a small random gpt-oss
MoE layer, compared bitwise with moeprep's layout of the same layer, tensor by tensor.

Used by ``moeprep doctor`` and by the plugin when a folder is served by a vLLM outside its recipe's verified
ranges (``runtime/quant_config.py``). vLLM's transforms are imported from the running vLLM, here only:
Triton's ``_swizzle_mxfp4`` (CUDA, on the GPU architecture the folder is for), Marlin's
``prepare_moe_mxfp4_layer_for_marlin`` (CUDA) and vLLM CPU's ``prepare_mxfp4_moe_layer_for_cpu`` (its AVX512-BF16
build). Other backends have no transform to prove here and are not checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeprep.layouts import cpu_amx, marlin, triton
from moeprep.layouts.mxfp4_experts import Mxfp4ExpertDims, packed_blocks

EXPERTS, HIDDEN, INTERMEDIATE = 2, 256, 256  # multiples of every backend's padding: no padding to reproduce
LAYOUT_MODULES = {"triton": triton, "marlin": marlin, "cpu": cpu_amx}
VllmTransform = Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]


class CannotCheck(Exception):
    """vLLM's transform for this backend cannot run here (no CUDA, another GPU, a vLLM build without the op)."""


@dataclass(frozen=True)
class LayoutCheck:
    """Which prepared tensors equal vLLM's own transform, on a layer drawn with ``seed``."""

    backend: str
    arch: str
    seed: int
    equal: dict[str, bool] = field(default_factory=dict)

    @property
    def first_mismatch(self) -> str | None:
        return next((name for name, same in self.equal.items() if not same), None)


def gpt_oss_expert_tensors(gen: torch.Generator, experts: int, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    """Random gpt-oss checkpoint tensors of one MoE layer (never zeros): packed e2m1 blocks [E, N, K/32, 16],
    e8m0 scales near 2^0, bf16 biases."""

    def u8(*shape: int, lo: int = 0, hi: int = 256) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.uint8)

    return {
        "gate_up_proj_blocks": u8(experts, 2 * inter, hidden // 32, 16),
        "gate_up_proj_scales": u8(experts, 2 * inter, hidden // 32, lo=110, hi=135),
        "gate_up_proj_bias": torch.randn(experts, 2 * inter, generator=gen).to(torch.bfloat16),
        "down_proj_blocks": u8(experts, hidden, inter // 32, 16),
        "down_proj_scales": u8(experts, hidden, inter // 32, lo=110, hi=135),
        "down_proj_bias": torch.randn(experts, hidden, generator=gen).to(torch.bfloat16),
    }


def random_layer(seed: int) -> dict[str, torch.Tensor]:
    return gpt_oss_expert_tensors(torch.Generator().manual_seed(seed), EXPERTS, HIDDEN, INTERMEDIATE)


def vllm_parameters(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer as vLLM's mxfp4 parameters hold it once loaded (sizes need no padding here)."""
    return {
        "w13": packed_blocks(layer["gate_up_proj_blocks"]),
        "w2": packed_blocks(layer["down_proj_blocks"]),
        "w13_scale": layer["gate_up_proj_scales"],
        "w2_scale": layer["down_proj_scales"],
        "w13_bias": layer["gate_up_proj_bias"],
        "w2_bias": layer["down_proj_bias"],
    }


def vllm_triton(layer: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    if not torch.cuda.is_available():
        raise CannotCheck("vLLM's Triton transform runs on a CUDA GPU")
    major, minor = torch.cuda.get_device_capability()
    if f"sm{major}{minor}" != arch:
        raise CannotCheck(f"vLLM's Triton transform for {arch} runs on an {arch} GPU, this one is sm{major}{minor}")
    from vllm.model_executor.layers.quantization.utils.mxfp4_utils import _swizzle_mxfp4

    params, out = vllm_parameters(layer), {}
    for w in ("w13", "w2"):
        value, _, scale = _swizzle_mxfp4(params[w].cuda(), params[f"{w}_scale"].cuda())
        out[f"moeprep_{w}_value"] = value.storage.data.mT.contiguous()
        scales = scale.storage.data
        out[f"moeprep_{w}_scale"] = scales.mT.contiguous() if arch == "sm90" else scales.contiguous()
        out[f"moeprep_{w}_bias"] = params[f"{w}_bias"].to(torch.float32)
    return out


def vllm_marlin(layer: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    if not torch.cuda.is_available():
        raise CannotCheck("vLLM's Marlin repack is a CUDA op")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_moe_mxfp4_layer_for_marlin

    params = {name: t.cuda() for name, t in vllm_parameters(layer).items()}
    module = torch.nn.Module()
    module.params_dtype = torch.bfloat16
    with set_current_vllm_config(VllmConfig()):
        outputs = prepare_moe_mxfp4_layer_for_marlin(module, *params.values())
    names = ["moeprep_w13_weight", "moeprep_w2_weight", "moeprep_w13_scale", "moeprep_w2_scale"]
    return dict(zip([*names, "moeprep_w13_bias", "moeprep_w2_bias"], outputs, strict=True))


def vllm_cpu(layer: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    if not hasattr(torch.ops._C, "convert_weight_packed"):
        raise CannotCheck("this vLLM CPU build has no convert_weight_packed (its AVX512-BF16 build has)")
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_mxfp4_moe_layer_for_cpu

    p = vllm_parameters(layer)
    w13, w2, w13_scale, w2_scale = prepare_mxfp4_moe_layer_for_cpu(p["w13"], p["w2"], p["w13_scale"], p["w2_scale"])
    return {
        "moeprep_w13_weight": w13,
        "moeprep_w2_weight": w2,
        "moeprep_w13_scale": w13_scale,
        "moeprep_w2_scale": w2_scale,
        "moeprep_w13_bias": p["w13_bias"].to(torch.float32),
        "moeprep_w2_bias": p["w2_bias"].to(torch.float32),
    }


VLLM_TRANSFORMS: dict[str, VllmTransform] = {"triton": vllm_triton, "marlin": vllm_marlin, "cpu": vllm_cpu}
NOT_CHECKED = {
    "none": "none folders hold the checkpoint's bytes; vLLM runs its own transform at load",
    "dequant": "dequant folders hold the checkpoint's bytes; the plugin dequantizes them itself",
}


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def check_layout(backend: str, arch: str, seed: int | None = None) -> LayoutCheck:
    """vLLM's own transform (``VLLM_TRANSFORMS``) against moeprep's layout for ``backend``/``arch`` on a fresh
    random layer; raises ``CannotCheck`` where vLLM's transform cannot run here or the backend has none."""
    if backend not in VLLM_TRANSFORMS:
        raise CannotCheck(NOT_CHECKED.get(backend, f"moeprep has no check for {backend} layouts yet"))
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    layer = random_layer(seed)
    expected = VLLM_TRANSFORMS[backend](layer, arch)
    dims = Mxfp4ExpertDims(EXPERTS, HIDDEN, INTERMEDIATE, HIDDEN, INTERMEDIATE)
    equal = {}
    for recipe in LAYOUT_MODULES[backend].prepared_expert_tensors(dims, arch):
        ours = recipe.transform(layer[recipe.source])
        equal[recipe.param] = recipe.param in expected and torch.equal(
            raw_bytes(ours), raw_bytes(expected[recipe.param])
        )
    return LayoutCheck(backend, arch, seed, equal)
