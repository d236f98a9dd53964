"""Fixtures are in the real models' on-disk formats: transformers loads each one with no missing,
unexpected or mismatched tensor, and real presets have the real expert shapes."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from moeprep.checkpoint.source import open_local
from moeprep.families import family_names, get_family
from moeprep.fixtures import build_fixture
from moeprep.fixtures.build import fixture_config
from moeprep.plan import Inventory, check_inventory
from tests.conftest import run_cli

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
    assert check_inventory(source, get_family(family)) == Inventory([], {})


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


def test_fp8_block_preset_has_deepseek_v3_fp8_shapes() -> None:
    """Shapes and dtypes published in deepseek-ai/DeepSeek-V3's (block-fp8) safetensors index."""
    ds = get_family("deepseek-v3")
    config = fixture_config("deepseek-v3", "v3", 4, "fp8-block")
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    specs = ds.checkpoint_specs(config)
    layer = "model.layers.3"
    expected = {
        f"{layer}.mlp.experts.255.gate_proj.weight": ("F8_E4M3", (2048, 7168)),
        f"{layer}.mlp.experts.255.gate_proj.weight_scale_inv": ("F32", (16, 56)),
        f"{layer}.mlp.experts.255.down_proj.weight_scale_inv": ("F32", (56, 16)),
        f"{layer}.mlp.shared_experts.up_proj.weight_scale_inv": ("F32", (16, 56)),
        f"{layer}.self_attn.kv_a_proj_with_mqa.weight_scale_inv": ("F32", (5, 56)),
        f"{layer}.self_attn.q_b_proj.weight_scale_inv": ("F32", (192, 12)),
        f"{layer}.mlp.gate.weight": ("BF16", (256, 7168)),  # routers, embeddings and LM head stay bf16
    }
    assert {k: (specs[k].dtype, specs[k].shape) for k in expected} == expected
    assert specs["lm_head.weight"].dtype == specs["model.embed_tokens.weight"].dtype == "BF16"
    assert f"{layer}.mlp.gate.weight_scale_inv" not in specs


def test_fp8_block_fixture_dequantizes_to_sane_weights_and_passes_inventory(tmp_path: Path) -> None:
    folder = build_fixture("deepseek-v3", tmp_path / "d", quantization="fp8-block")
    source = open_local(folder)
    assert check_inventory(source, get_family("deepseek-v3")) == Inventory([], {})
    weight = source.read("model.layers.1.mlp.experts.3.up_proj.weight")
    scale = source.read("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv")
    assert weight.dtype == torch.float8_e4m3fn and scale.shape == (1, 1)
    std = (weight.float() * scale).std().item()
    assert 0.5 / 128**0.5 < std < 2 / 128**0.5  # like a bf16 linear of fan-in 128


@pytest.mark.parametrize(
    "quantization_config",
    [{"quant_method": "compressed-tensors"}, {"quant_method": "fp8"}, {"quant_method": "awq", "bits": 4}],
)
def test_other_quantized_checkpoints_are_refused_in_one_line(tmp_path: Path, quantization_config: dict) -> None:
    folder = build_fixture("qwen3-moe", tmp_path / "q")
    config_path = folder / "config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "quantization_config": quantization_config})
    )
    result = run_cli("convert", folder, tmp_path / "out")
    assert result.returncode == 2
    assert "is not supported; moeprep reads bf16/fp16/fp32, block-scaled fp8" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
