"""On an sm90 GPU with vLLM 0.26: the triton layout equals vLLM's own ``_swizzle_mxfp4`` bitwise, and a
prepared tiny gpt-oss generates exactly the tokens of the original on the Triton mxfp4 backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeprep.convert import convert, load_plan
from moeprep.fixtures import build_fixture
from moeprep.layouts.triton_hopper import swizzle_hopper_scale, swizzle_hopper_value

OUT = Path(os.environ.get("OUT", "/tmp/moeprep-gpu-out"))
HERE = Path(__file__).parent


@pytest.mark.parametrize(("experts", "rows", "k"), [(4, 5760, 2880), (4, 2880, 2880), (3, 384, 192), (2, 200, 320)])
def test_layout_equals_vllm_swizzle_on_gpu(experts: int, rows: int, k: int) -> None:
    from vllm.model_executor.layers.quantization.utils.mxfp4_utils import _swizzle_mxfp4

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the triton sm90 layout is defined for Hopper")
    gen = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
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


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("gpt-oss")
    src = build_fixture("gpt-oss", root / "src")
    source, plan = load_plan(str(src), "triton", arch="sm90")
    convert(source, plan, root / "triton")
    return src, root / "triton"


def test_prepared_triton_generates_original_tokens(tiny_gpt_oss: tuple[Path, Path]) -> None:
    src, prepared = tiny_gpt_oss
    original = generate(src, "gpt-oss-original")
    converted = generate(prepared, "gpt-oss-triton")
    log = (OUT / "gpt-oss-triton.log").read_text()
    assert "quantization=moeprep" in log
    assert converted == original
    assert all(len(set(t)) > 4 for t in original)


def test_runtime_refuses_when_vllm_selects_another_backend(tiny_gpt_oss: tuple[Path, Path]) -> None:
    _, prepared = tiny_gpt_oss
    log = OUT / "gpt-oss-triton-on-marlin.log"
    with log.open("w") as f:
        code = subprocess.run(
            [
                sys.executable,
                str(HERE / "generate.py"),
                str(prepared),
                str(OUT / "never.json"),
                "--moe-backend",
                "marlin",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    assert code != 0
    assert "holds triton (matmul_ogs) layouts" in log.read_text()
