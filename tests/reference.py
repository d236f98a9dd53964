"""Reference transforms from the targeted vLLM version, when present (``scripts/fetch_reference.sh``)."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Union

import pytest
import torch

REFERENCE_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "reference" / "vllm-0.26.0"
FLASHINFER_ROOT = REFERENCE_ROOT.parent / "flashinfer-0.6.14"  # the version vLLM 0.26.0 pins
VLLM_MXFP4_ORACLE = REFERENCE_ROOT / "vllm/model_executor/layers/fused_moe/oracle/mxfp4.py"


def triton_kernels_or_skip() -> ModuleType:
    """The triton_kernels vendored in vLLM 0.26.0 (the version the GPU layouts target)."""
    if REFERENCE_ROOT.is_dir() and str(REFERENCE_ROOT) not in sys.path:
        sys.path.insert(0, str(REFERENCE_ROOT))
    return pytest.importorskip("triton_kernels", reason="run scripts/fetch_reference.sh for the live reference")


def reference_hopper_value(blocks: torch.Tensor) -> torch.Tensor:
    """vLLM 0.26 ``_swizzle_mxfp4`` value path on sm90: contiguous storage of the swizzled tensor."""
    triton_kernels_or_skip()
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details.layout import HopperMXValueLayout

    swizzled = convert_layout(wrap_torch_tensor(blocks.transpose(-2, -1), dtype=FP4), HopperMXValueLayout, mx_axis=1)
    return swizzled.storage.data.mT.contiguous()


def reference_hopper_scale(scales: torch.Tensor, num_warps: int = 8) -> torch.Tensor:
    """vLLM 0.26 ``_swizzle_mxfp4`` scale path on sm90 (scale K padded to 0 mod 4 first)."""
    triton_kernels_or_skip()
    from triton_kernels.tensor import convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details.layout import HopperMXScaleLayout

    padded = torch.nn.functional.pad(scales, (0, -scales.shape[-1] % 4)).transpose(-2, -1)
    swizzled = convert_layout(wrap_torch_tensor(padded), HopperMXScaleLayout, mx_axis=1, num_warps=num_warps)
    return swizzled.storage.data.mT.contiguous()


def reference_blackwell(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.26 ``_swizzle_mxfp4`` on sm100: storage of the value and scale tensors."""
    triton_kernels_or_skip()
    from triton_kernels.tensor import FP4, convert_layout, wrap_torch_tensor
    from triton_kernels.tensor_details.layout import BlackwellMXScaleLayout, BlackwellMXValueLayout

    value = convert_layout(wrap_torch_tensor(blocks.transpose(-2, -1), dtype=FP4), BlackwellMXValueLayout)
    scale = convert_layout(wrap_torch_tensor(scales.transpose(-2, -1)), BlackwellMXScaleLayout)
    return value.storage.data.mT.contiguous(), scale.storage.data.contiguous()


def reference_definitions(path: Path, names: set[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """The top-level functions, classes and assignments ``names`` of a reference source file, executed as
    written in ``namespace`` (the rest of the file, and its imports, are left out)."""
    if not path.is_file():
        pytest.skip(f"{path} missing: run scripts/fetch_reference.sh for the live reference")
    tree = ast.parse(path.read_text())

    def defined(node: ast.stmt) -> set[str]:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            return {node.name}
        if isinstance(node, ast.Assign):
            return {t.id for t in node.targets if isinstance(t, ast.Name)}
        return set()

    body = [node for node in tree.body if defined(node) & names]
    found = set().union(*(defined(node) for node in body))
    assert found >= names, f"{path} no longer defines {sorted(names - found)}"
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def flashinfer_block_scale_interleave() -> Callable[[torch.Tensor], torch.Tensor]:
    """flashinfer's ``block_scale_interleave`` (a CUDA op) on CPU, derived from the inverse that flashinfer
    itself ships in Python (``gemm_bf16_fp4._unswizzle_sf_128x4``): the swizzled offset of every (row, column)
    is read back one byte of the offset at a time."""
    unswizzle = reference_definitions(
        FLASHINFER_ROOT / "flashinfer/gemm/gemm_bf16_fp4.py", {"_unswizzle_sf_128x4"}, {"torch": torch}
    )["_unswizzle_sf_128x4"]

    def interleave(sf: torch.Tensor) -> torch.Tensor:
        rows, cols = sf.shape
        size = -(-rows // 128) * 128 * (-(-cols // 4) * 4)
        index = torch.arange(size)
        offsets = sum(
            unswizzle(((index >> (8 * p)) & 255).to(torch.uint8), rows, cols).long() << (8 * p) for p in range(3)
        )
        out = torch.zeros(size, dtype=sf.dtype)
        out[offsets.reshape(-1)] = sf.reshape(-1)
        return out

    return interleave


def vllm_trtllm_mxfp4_conversion(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[torch.Tensor, ...]]:
    """vLLM 0.26's ``convert_gpt_oss_weight_to_mxfp4_moe_kernel_format`` for its TRT-LLM backends, run as
    written with flashinfer 0.6.14's row shuffles and ``flashinfer_block_scale_interleave``:
    ``(w13, w2, w13_scale, w2_scale, w13_bias, w2_bias)`` of the padded parameters -> the kernel's tensors."""
    shuffles = reference_definitions(
        FLASHINFER_ROOT / "flashinfer/utils.py",
        {
            "srcToDstBlk16RowMap",
            "srcToDstBlk32RowMap",
            "get_shuffle_block_size",
            "get_shuffle_matrix_a_row_indices",
            "get_shuffle_matrix_sf_a_row_indices",
        },
        {"torch": torch},
    )
    core = reference_definitions(
        FLASHINFER_ROOT / "flashinfer/fused_moe/core.py",
        {"get_w2_permute_indices_with_cache"},
        {"torch": torch, "Union": Union, **shuffles},
    )
    package, fused_moe = ModuleType("flashinfer"), ModuleType("flashinfer.fused_moe")
    fp4, core_module = ModuleType("flashinfer.fp4_quantization"), ModuleType("flashinfer.fused_moe.core")
    fp4.nvfp4_block_scale_interleave = flashinfer_block_scale_interleave()
    core_module.get_w2_permute_indices_with_cache = core["get_w2_permute_indices_with_cache"]
    for name, module in (
        ("flashinfer", package),
        ("flashinfer.fp4_quantization", fp4),
        ("flashinfer.fused_moe", fused_moe),
        ("flashinfer.fused_moe.core", core_module),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    from enum import Enum

    oracle = reference_definitions(
        VLLM_MXFP4_ORACLE,
        {"Mxfp4MoeBackend", "TRTLLM_BACKENDS", "convert_gpt_oss_weight_to_mxfp4_moe_kernel_format"},
        {"torch": torch, "Union": Union, "Enum": Enum},
    )
    backend = oracle["Mxfp4MoeBackend"].FLASHINFER_TRTLLM_MXFP4_BF16
    convert = oracle["convert_gpt_oss_weight_to_mxfp4_moe_kernel_format"]

    def run(*params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return convert(backend, None, *params, _cache_permute_indices={})

    return run
