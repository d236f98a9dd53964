"""The Triton recipe's vLLM range rests on each release's reference code: the vendored ``triton_kernels`` and
``_swizzle_mxfp4`` fingerprinted from the wheels of 0.26.0, 0.30.0 and 0.34.0 (scripts/record_reference_sources.py,
tests/golden/reference_sources.json). tests/test_layout_triton.py runs 0.26.0's code bitwise on CPU; a release
in the range must share that code, or have its differing swizzle verified on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeprep.layouts import triton
from moeprep.schema.vllm_versions import in_ranges
from scripts.record_reference_sources import tree_sha256
from tests.reference import REFERENCE_ROOT

RECORDED = json.loads((Path(__file__).parent / "golden" / "reference_sources.json").read_text())
RELEASES = RECORDED["releases"]


def test_every_recorded_release_in_the_triton_range_has_the_reference_code_of_0_26() -> None:
    in_range = [v for v in RELEASES if in_ranges(v, triton.VLLM_RANGES)]
    assert {"0.26.0", "0.30.0", "0.34.0"} <= set(in_range)
    for version in in_range:
        assert RELEASES[version]["triton_kernels"] == RELEASES["0.26.0"]["triton_kernels"], version
        same_swizzle = RELEASES[version]["_swizzle_mxfp4"] == RELEASES["0.26.0"]["_swizzle_mxfp4"]
        assert same_swizzle or version in RECORDED["swizzle_differs_but_verified"], version


def test_the_ranges_end_at_recorded_releases() -> None:
    for low, high in triton.VLLM_RANGES:
        assert low in RELEASES and high in RELEASES


def test_the_live_reference_is_the_recorded_code() -> None:
    kernels = REFERENCE_ROOT / "triton_kernels"
    if not kernels.is_dir():
        pytest.skip("run scripts/fetch_reference.sh for the live reference")
    files = {p.relative_to(kernels).as_posix(): p.read_bytes() for p in kernels.rglob("*.py")}
    assert tree_sha256(files) == RELEASES["0.26.0"]["triton_kernels"]
