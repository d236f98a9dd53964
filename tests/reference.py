"""Reference transforms from the targeted vLLM version, when present (``scripts/fetch_reference.sh``)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REFERENCE_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "reference" / "vllm-0.26.0"


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
