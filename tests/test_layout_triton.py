"""Triton ``matmul_ogs`` mxfp4 layouts (Hopper sm90, Blackwell sm100), bitwise against vLLM 0.26.0's
triton_kernels: committed golden hashes of seeded inputs always, and the live reference on fresh random
inputs when it is present (CI fetches it with scripts/fetch_reference.sh)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeprep.layouts.triton_blackwell import (
    blackwell_scale_storage_shape,
    blackwell_value_storage_shape,
    swizzle_blackwell_scale,
    swizzle_blackwell_value,
)
from moeprep.layouts.triton_hopper import (
    hopper_scale_storage_shape,
    hopper_value_storage_shape,
    swizzle_hopper_scale,
    swizzle_hopper_value,
    swizzle_hopper_value_fused,
    swizzle_hopper_value_torch,
)
from tests.conftest import fresh_seed
from tests.golden_inputs import TRITON_CASES, mxfp4_inputs
from tests.reference import reference_blackwell, reference_hopper_scale, reference_hopper_value

Layouts = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# arch -> (golden file, implementations of (value, scale) to check, reference)
ARCHES: dict[str, tuple[str, list[Layouts], Layouts]] = {
    "sm90": (
        "triton_hopper_sm90.json",
        [
            lambda b, s: (swizzle_hopper_value_fused(b), swizzle_hopper_scale(s)),
            lambda b, s: (swizzle_hopper_value_torch(b), swizzle_hopper_scale(s)),
        ],
        lambda b, s: (reference_hopper_value(b), reference_hopper_scale(s)),
    ),
    "sm100": (
        "triton_blackwell_sm100.json",
        [lambda b, s: (swizzle_blackwell_value(b), swizzle_blackwell_scale(s))],
        reference_blackwell,
    ),
}
GOLDEN = {
    arch: json.loads((Path(__file__).parent / "golden" / file).read_text())["cases"]
    for arch, (file, _, _) in ARCHES.items()
}
FRESH_SHAPES = [(2, 5760, 2880), (2, 2880, 2880), (3, 2 * 192, 192), (1, 192, 192), (2, 136, 320), (1, 1000, 64)]


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("arch", ARCHES)
def test_golden_cases_cover_the_declared_inputs(arch: str) -> None:
    assert [{k: c[k] for k in ("seed", "experts", "rows", "k")} for c in GOLDEN[arch]] == TRITON_CASES


@pytest.mark.parametrize(
    ("arch", "case"),
    [(a, c) for a in ARCHES for c in GOLDEN[a]],
    ids=lambda x: x if isinstance(x, str) else f"E{x['experts']}-N{x['rows']}-K{x['k']}",
)
def test_matches_golden_reference_hashes(arch: str, case: dict) -> None:
    blocks, scales = mxfp4_inputs(case["seed"], case["experts"], case["rows"], case["k"])
    assert (sha(blocks), sha(scales)) == (case["blocks"], case["scales"]), "seeded inputs changed; regenerate golden"
    for layouts in ARCHES[arch][1]:
        value, scale = layouts(blocks, scales)
        assert list(value.shape) == case["value_shape"] and sha(value) == case["value"]
        assert list(scale.shape) == case["scale_shape"] and sha(scale) == case["scale"]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(("experts", "rows", "k"), FRESH_SHAPES)
def test_matches_live_reference_on_fresh_random_inputs(arch: str, experts: int, rows: int, k: int) -> None:
    seed = fresh_seed()
    blocks, scales = mxfp4_inputs(seed, experts, rows, k)
    expected_value, expected_scale = ARCHES[arch][2](blocks, scales)
    for layouts in ARCHES[arch][1]:
        value, scale = layouts(blocks, scales)
        assert value.shape == expected_value.shape and torch.equal(value, expected_value), f"seed {seed}"
        assert scale.shape == expected_scale.shape and torch.equal(scale, expected_scale), f"seed {seed}"


def test_cpu_dispatch_uses_the_fused_kernel_and_agrees_with_torch() -> None:
    blocks, _ = mxfp4_inputs(fresh_seed(), 3, 77, 160)  # neither dim padded evenly
    assert torch.equal(swizzle_hopper_value(blocks), swizzle_hopper_value_torch(blocks))
    narrow = blocks[:, :, :40].contiguous()
    assert torch.equal(swizzle_hopper_value(narrow), swizzle_hopper_value_torch(narrow))


@pytest.mark.parametrize("num_warps", [4, 8, 16])
def test_hopper_scale_num_warps_variants_match_reference(num_warps: int) -> None:
    _, scales = mxfp4_inputs(fresh_seed(), 2, 700, 2880)
    expected = reference_hopper_scale(scales, num_warps)
    assert torch.equal(swizzle_hopper_scale(scales, num_warps), expected)


def test_storage_shapes_are_known_without_data() -> None:
    assert hopper_value_storage_shape(128, 5760, 1440) == (128, 1440, 5760)
    assert hopper_scale_storage_shape(128, 5760, 90) == (128, 184, 2944)
    assert hopper_scale_storage_shape(128, 2880, 90, num_warps=8) == (128, 96, 2944)
    assert blackwell_value_storage_shape(128, 5760, 1440) == (128, 5760, 1536)
    assert blackwell_scale_storage_shape(128, 5760, 90) == (1, 5760, 24, 2, 256)


def test_non_power_of_two_warps_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        swizzle_hopper_scale(torch.ones(1, 32, 4, dtype=torch.uint8), num_warps=6)
