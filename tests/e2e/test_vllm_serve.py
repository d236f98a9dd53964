"""``vllm serve`` (vLLM CPU) on loopback: converted checkpoints generate exactly what the originals do,
and vLLM refuses prepared folders it cannot load correctly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import resaved_by_transformers, run_cli
from tests.e2e.vllm_server import run_until_exit, serve_and_generate

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("converted")

    def get(family: str) -> Path:
        dest = root / family
        if not dest.exists():
            result = run_cli("convert", source(tiny, family, root), dest)
            assert result.returncode == 0, result.stderr
        return dest

    return get


def source(tiny, family: str, root: Path) -> Path:
    """``family``'s tiny checkpoint; ``FAMILY@transformers``: with its config re-saved by the installed transformers
    (5.x writes Qwen3-MoE's ``num_experts`` as ``num_local_experts``)."""
    name, _, saved_by = family.partition("@")
    if not saved_by:
        return tiny(name)
    dest = root / f"{name}-resaved"
    return dest if dest.exists() else resaved_by_transformers(tiny(name), dest)


@pytest.mark.parametrize("family", ["glm4-moe", "qwen2-moe", "qwen3-moe@transformers"])
def test_converted_generates_the_same_greedy_tokens(tiny, converted, family: str, tmp_path: Path) -> None:
    if "@" in family:
        pytest.importorskip("transformers")
    original = serve_and_generate(source(tiny, family, tmp_path), tmp_path / "original.log")
    prepared = serve_and_generate(converted(family), tmp_path / "prepared.log")
    assert "quantization=moeprep" in (tmp_path / "prepared.log").read_text()
    assert prepared == original
    assert all(len(set(tokens)) > 4 for tokens in original), "degenerate generations cannot tell models apart"


def test_vllm_without_plugin_refuses_prepared_folder(converted, tmp_path: Path) -> None:
    code, output = run_until_exit(converted("glm4-moe"), tmp_path / "noplugin.log", plugins=False)
    assert code != 0
    assert "Unknown quantization method: moeprep" in output


def test_runtime_refuses_folder_whose_files_do_not_match_the_manifest(converted, tmp_path: Path) -> None:
    folder = shutil.copytree(converted("glm4-moe"), tmp_path / "tampered")
    shard = next(folder.glob("model-*.safetensors"))
    with shard.open("ab") as f:
        f.write(b"\x00" * 16)
    code, output = run_until_exit(folder, tmp_path / "tampered.log")
    assert code != 0
    assert f"{shard.name} has {shard.stat().st_size} bytes, the manifest records {shard.stat().st_size - 16}" in output
