"""On a GPU with vLLM: the load-time layout check (``moeprep.layout_check``) finds moeprep's Triton and Marlin
layouts bitwise equal to the running vLLM's own transforms of a random layer, as ``moeprep doctor`` reports."""

from __future__ import annotations

import pytest
import torch

from moeprep.layout_check import check_layout


@pytest.mark.parametrize("backend", ["triton", "marlin"])
def test_layouts_equal_the_running_vllm_transform(backend: str) -> None:
    major, minor = torch.cuda.get_device_capability()
    arch = "any" if backend == "marlin" else f"sm{major}{minor}"
    if backend == "triton" and arch not in ("sm90", "sm100"):
        pytest.skip("triton layouts are defined for sm90 and sm100")
    check = check_layout(backend, arch)
    print(f"{backend} {arch} seed {check.seed}: {check.equal}")
    assert check.equal and check.first_mismatch is None, check
