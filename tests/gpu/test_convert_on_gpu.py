"""``convert --device cuda``: chunks made on the GPU go straight into the writer's pinned O_DIRECT buffers; the
prepared folder is byte for byte the one ``--device cpu`` writes, for every mxfp4 layout backend, also split
into tensor- or expert-parallel rank files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moeprep.checkpoint import file_sink
from moeprep.checkpoint.file_sink import DirectFile
from moeprep.convert import convert, load_plan
from moeprep.fixtures import build_fixture
from moeprep.plan import PlanOptions
from tests.conftest import fresh_seed

NEEDS_VLLM = False


def test_gpu_chunks_written_through_the_pinned_ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_sink, "SLOT_BYTES", 1 << 20)
    monkeypatch.setattr(file_sink, "SLOTS", 3)
    gen = torch.Generator(device="cuda").manual_seed(fresh_seed())
    sizes = [1, 4095, 1 << 20, (3 << 20) + 17, 12345]
    chunks = [torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8, device="cuda") for n in sizes]
    seen: list[bytes] = []
    sink = DirectFile(os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    for chunk in chunks:
        sink.write(chunk, lambda view: seen.append(bytes(view)) or [])
    assert sink.close() == sum(sizes)
    expected = b"".join(c.cpu().numpy().tobytes() for c in chunks)
    assert (tmp_path / "f.bin").read_bytes() == expected and b"".join(seen) == expected


@pytest.fixture(scope="module")
def gpt_oss_20b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two gpt-oss-20b-sized layers (real expert dims): each expert tensor comes in several chunks."""
    path = tmp_path_factory.mktemp("src") / "gpt-oss-20b-2l"
    build_fixture("gpt-oss", path, preset="20b", num_layers=2)
    return path


@pytest.mark.parametrize(
    ("backend", "ranks"),
    [("triton", {}), ("marlin", {}), ("none", {}), ("triton", {"tp_size": 2}), ("marlin", {"ep_size": 2})],
)
def test_cuda_conversion_equals_cpu_conversion(
    gpt_oss_20b: Path, tmp_path: Path, backend: str, ranks: dict[str, int]
) -> None:
    folders = {}
    for device in ("cpu", "cuda"):
        source, plan = load_plan(str(gpt_oss_20b), backend, options=PlanOptions(device=device, **ranks))
        folders[device] = tmp_path / device
        convert(source, plan, folders[device])
    names = sorted(p.name for p in folders["cpu"].iterdir())
    assert names == sorted(p.name for p in folders["cuda"].iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            assert (folders["cpu"] / name).read_bytes() == (folders["cuda"] / name).read_bytes(), name
