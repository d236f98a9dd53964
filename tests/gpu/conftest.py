"""GPU tier: run with tests/gpu/run_all.sh on the GPU host; skipped where CUDA or vLLM is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip where CUDA is missing, and where vLLM is, unless the module sets ``NEEDS_VLLM = False``."""
    for item in items:
        if "tests/gpu/" not in str(item.fspath):
            continue
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif getattr(item.module, "NEEDS_VLLM", True) and not HAS_VLLM:
            item.add_marker(pytest.mark.skip(reason="needs vLLM"))
