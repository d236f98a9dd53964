"""GPU tier: run with tests/gpu/run_all.sh on the GPU host; skipped where CUDA or vLLM is missing."""

from __future__ import annotations

import importlib.util

import pytest
import torch

REASON = (
    "needs a CUDA GPU"
    if not torch.cuda.is_available()
    else "needs vLLM"
    if importlib.util.find_spec("vllm") is None
    else None
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if REASON:
        for item in items:
            if "tests/gpu/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=REASON))
