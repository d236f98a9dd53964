"""Fixtures are in the real models' on-disk formats: transformers loads each one with no missing,
unexpected or mismatched tensor, and real presets have the real expert shapes."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch

from moeprep.checkpoint.source import open_local
from moeprep.families import family_names, get_family
from moeprep.fixtures import build_fixture
from moeprep.plan import check_inventory

FAMILIES = family_names()


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_fixture_without_missing_or_unexpected_keys(tiny, family: str) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it for mxfp4 (gpt-oss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tiny(family), output_loading_info=True, dtype=torch.bfloat16
        )
    assert {k: list(v) for k, v in info.items() if v} == {}
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all() and logits.float().std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_is_sharded_and_matches_family_inventory(tiny, family: str) -> None:
    source = open_local(tiny(family))
    assert len(source.weight_files) >= 2
    assert check_inventory(source, get_family(family)) == []


def test_fixture_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = build_fixture("qwen3-moe", tmp_path / "a", seed=7)
    b = build_fixture("qwen3-moe", tmp_path / "b", seed=7)
    c = build_fixture("qwen3-moe", tmp_path / "c", seed=8)
    assert folder_digest(a) == folder_digest(b)
    digest_a, digest_c = folder_digest(a), folder_digest(c)
    assert all(digest_a[n] != digest_c[n] for n in digest_a if n.endswith(".safetensors"))


def test_real_presets_have_real_expert_shapes() -> None:
    """Shapes published in openai/gpt-oss-120b and deepseek-ai/DeepSeek-V3 safetensors indexes."""
    gpt = get_family("gpt-oss")
    specs = gpt.tensor_specs(gpt.preset_config("120b", 1))
    experts = "model.layers.0.mlp.experts"
    assert specs[f"{experts}.gate_up_proj_blocks"].shape == (128, 5760, 90, 16)
    assert specs[f"{experts}.gate_up_proj_scales"].shape == (128, 5760, 90)
    assert specs[f"{experts}.gate_up_proj_bias"].shape == (128, 5760)
    assert specs[f"{experts}.down_proj_blocks"].shape == (128, 2880, 90, 16)
    assert specs["model.layers.0.self_attn.q_proj.weight"].shape == (4096, 2880)
    assert specs["model.layers.0.self_attn.sinks"].shape == (64,)
    ds = get_family("deepseek-v3")
    specs = ds.tensor_specs(ds.preset_config("v3", 4))
    assert specs["model.layers.3.mlp.experts.255.gate_proj.weight"].shape == (2048, 7168)
    assert specs["model.layers.3.mlp.shared_experts.down_proj.weight"].shape == (7168, 2048)
    assert specs["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert specs["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 7168)
    assert specs["model.layers.0.self_attn.q_b_proj.weight"].shape == (24576, 1536)


def test_large_preset_streams_in_slices(tmp_path: Path) -> None:
    """A 20b-dims layer is written slice by slice and reads back with the right shapes."""
    folder = build_fixture("gpt-oss", tmp_path / "g", preset="20b", num_layers=1)
    source = open_local(folder)
    dtype, shape = source.tensor_meta("model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert (dtype, shape) == ("U8", (32, 5760, 90, 16))
    scales = source.read("model.layers.0.mlp.experts.down_proj_scales")
    assert scales.min() >= 118 and scales.max() < 124
