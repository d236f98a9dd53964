"""On an sm90 GPU with vLLM 0.26 or 0.34: the triton layout equals vLLM's own ``_swizzle_mxfp4`` bitwise, and a
prepared tiny gpt-oss (triton and marlin layouts, and ``none``: padding only, vLLM transforms at load)
generates exactly the tokens of the original."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeprep.convert import convert, load_plan
from moeprep.fixtures import build_fixture
from moeprep.layouts.triton_hopper import swizzle_hopper_scale, swizzle_hopper_value
from moeprep.plan import PlanOptions
from tests.conftest import fresh_seed

OUT = Path(os.environ.get("OUT", "/tmp/moeprep-gpu-out"))
HERE = Path(__file__).parent


@pytest.mark.parametrize(("experts", "rows", "k"), [(4, 5760, 2880), (4, 2880, 2880), (3, 384, 192), (2, 200, 320)])
def test_layout_equals_vllm_swizzle_on_gpu(experts: int, rows: int, k: int) -> None:
    from vllm.model_executor.layers.quantization.utils.mxfp4_utils import _swizzle_mxfp4

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the triton sm90 layout is defined for Hopper")
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    blocks = torch.randint(0, 256, (experts, rows, k // 2), generator=gen, dtype=torch.uint8, device="cuda")
    scales = torch.randint(110, 135, (experts, rows, k // 32), generator=gen, dtype=torch.uint8, device="cuda")
    value, _, scale = _swizzle_mxfp4(blocks, scales)
    expected_value = value.storage.data.mT.contiguous()
    expected_scale = scale.storage.data.mT.contiguous()
    assert torch.equal(swizzle_hopper_value(blocks), expected_value)
    assert torch.equal(swizzle_hopper_scale(scales), expected_scale)
    assert torch.equal(swizzle_hopper_value(blocks.cpu()), expected_value.cpu())


def generate(model: Path, name: str, *extra: str) -> list[list[int]]:
    out = OUT / f"{name}.json"
    log = OUT / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.run(
            [sys.executable, str(HERE / "generate.py"), str(model), str(out), *extra],
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    assert code == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())["tokens"]


# backend -> vLLM moe_backend that selects its kernel ("auto" picks TRITON on Hopper), and that kernel
VLLM_MOE_BACKEND = {"triton": [], "marlin": ["--moe-backend", "marlin"], "none": []}
VLLM_KERNEL = {"triton": "TRITON", "marlin": "MARLIN", "none": "TRITON"}


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("gpt-oss")
    # intermediate 160: every backend pads it (triton and none to 192, marlin to 256)
    folders = {"original": build_fixture("gpt-oss", root / "src", config_overrides={"intermediate_size": 160})}
    for backend in VLLM_MOE_BACKEND:
        source, plan = load_plan(
            str(folders["original"]),
            backend,
            options=PlanOptions(arch="sm90" if backend in ("triton", "none") else None),
        )
        convert(source, plan, root / backend)
        folders[backend] = root / backend
    return folders


@pytest.mark.parametrize("backend", list(VLLM_MOE_BACKEND))
def test_prepared_generates_original_tokens(tiny_gpt_oss: dict[str, Path], backend: str) -> None:
    original = generate(tiny_gpt_oss["original"], f"gpt-oss-original-{backend}", *VLLM_MOE_BACKEND[backend])
    converted = generate(tiny_gpt_oss[backend], f"gpt-oss-{backend}", *VLLM_MOE_BACKEND[backend])
    log = (OUT / f"gpt-oss-{backend}.log").read_text()
    assert "quantization=moeprep" in log
    assert re.search(f"Using '?{VLLM_KERNEL[backend]}'? Mxfp4 MoE backend", log)  # quoted up to vLLM 0.33
    assert converted == original
    assert all(len(set(t)) > 4 for t in original)


@pytest.mark.parametrize(
    ("backend", "served_with", "layout"),
    [
        ("triton", ["--moe-backend", "marlin"], "triton (matmul_ogs)"),
        ("marlin", [], "Marlin"),
    ],
)
def test_runtime_refuses_when_vllm_selects_another_backend(
    tiny_gpt_oss: dict[str, Path], backend: str, served_with: list[str], layout: str
) -> None:
    log = OUT / f"gpt-oss-{backend}-refused.log"
    with log.open("w") as f:
        command = [sys.executable, str(HERE / "generate.py"), str(tiny_gpt_oss[backend]), str(OUT / "never.json")]
        code = subprocess.run([*command, *served_with], stdout=f, stderr=subprocess.STDOUT).returncode
    assert code != 0
    assert f"holds {layout} layouts" in log.read_text()
