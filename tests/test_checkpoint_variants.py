"""Checkpoints as other tools save them convert: configs written by transformers 5.x (renamed keys), float
tensors in another float dtype than the family's usual one, multi-token-prediction layers; what moeprep cannot
read is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprep.checkpoint.source import open_local
from moeprep.convert import convert, load_plan
from moeprep.errors import UnsupportedModelError
from moeprep.families import family_names
from moeprep.families.config_view import ALIASES, ConfigView
from moeprep.fixtures import build_fixture
from moeprep.plan import PlanOptions, build_plan
from moeprep.schema.manifest import load_manifest
from tests.conftest import (
    deepseek_style_by_transformers,
    fresh_seed,
    resaved_by_transformers,
    run_cli,
    unquantized_gpt_oss_by_transformers,
    with_tensors_cast,
)


def plan_rows(folder: Path) -> list[tuple]:
    plan = build_plan(open_local(folder))
    return sorted((j.entry.name, j.entry.dtype, j.entry.shape, j.recipe, j.sources) for j in plan.jobs)


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("family", family_names())
def test_config_saved_by_transformers_plans_like_the_original(tiny, tmp_path: Path, family: str) -> None:
    pytest.importorskip("transformers")
    resaved = resaved_by_transformers(tiny(family), tmp_path / family)
    assert json.loads((resaved / "config.json").read_text()) != json.loads((tiny(family) / "config.json").read_text())
    assert plan_rows(resaved) == plan_rows(tiny(family))


def test_qwen3_moe_saved_by_transformers_5_converts(tiny, tmp_path: Path) -> None:
    """transformers 5.x writes Qwen3-MoE's ``num_experts`` as ``num_local_experts`` (and ``dtype``,
    ``rope_parameters``)."""
    transformers = pytest.importorskip("transformers")
    resaved = resaved_by_transformers(tiny("qwen3-moe"), tmp_path / "src")
    config = json.loads((resaved / "config.json").read_text())
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert "num_local_experts" in config and "num_experts" not in config
    result = run_cli("convert", resaved, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 8


def test_unquantized_gpt_oss_saved_by_transformers_converts_as_stored(tmp_path: Path) -> None:
    """vLLM loads a bf16 gpt-oss (3-D experts with biases, no quantization_config) as stored: the default convert
    passes every tensor through; what only applies to mxfp4 or per-expert tensors is refused in one line."""
    pytest.importorskip("transformers")
    src = unquantized_gpt_oss_by_transformers(tmp_path / "src", fresh_seed())
    result = run_cli("convert", src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "3-D expert tensors are loaded by vLLM as stored" in result.stdout and "--tp N" not in result.stdout
    original = {k: v for shard in src.glob("*.safetensors") for k, v in load_file(shard).items()}
    stored = {k: v for shard in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(shard).items()}
    assert "model.layers.0.mlp.experts.gate_up_proj_bias" in stored and stored.keys() == original.keys()
    assert all(torch.equal(stored[name], tensor) for name, tensor in original.items())
    for args, words in (
        (("--backend", "marlin"), ("backend marlin lays out mxfp4 experts", "--backend none")),
        (("--tp", "2"), ("--tp 2", "not split per rank")),
    ):
        assert_one_line_error(run_cli("convert", src, tmp_path / "refused", *args), *words)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    assert_one_line_error(run_cli("convert", src, tmp_path / "refused"), "quantization_config 'bitsandbytes'")
    assert not (tmp_path / "refused").exists()


def test_aliases_are_the_ones_transformers_declares() -> None:
    """Every ``attribute_map`` entry of the families' transformers config classes that names a key moeprep reads
    is in ``ALIASES`` (moeprep does not import transformers at run time)."""
    from transformers import CONFIG_MAPPING

    for model_type, groups in ALIASES.items():
        declared = {frozenset(pair) for pair in CONFIG_MAPPING[model_type].attribute_map.items()}
        ours = {frozenset(group) for group in groups}
        assert ours <= declared, (model_type, ours - declared)
    for model_type in ("qwen2_moe", "llama4_text"):
        assert model_type not in ALIASES and not CONFIG_MAPPING[model_type].attribute_map


def test_config_view_answers_for_aliases_and_names_what_is_missing() -> None:
    view = ConfigView({"model_type": "qwen3_moe", "num_local_experts": 8, "dtype": "bfloat16"})
    assert view["num_experts"] == 8 and view["torch_dtype"] == "bfloat16" and "num_experts" in view
    assert view.get("hidden_size", 7) == 7
    with pytest.raises(UnsupportedModelError, match="has no 'hidden_size'"):
        view["hidden_size"]


def test_config_without_a_needed_key_is_one_line(tiny, tmp_path: Path) -> None:
    src = shutil.copytree(tiny("qwen3-moe"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["num_experts"]
    (src / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("convert", src, tmp_path / "out"), "'num_experts' / 'num_local_experts'")
    assert not (tmp_path / "out").exists()


def test_architectures_of_the_wrong_type_is_one_line_before_anything_is_written(tiny, tmp_path: Path) -> None:
    """Found by the fuzz (``architectures: true``): the manifest's copy of it used to raise a TypeError."""
    src = shutil.copytree(tiny("gpt-oss"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": True}))
    assert_one_line_error(run_cli("convert", src, tmp_path / "out"), "architectures is true", "a list of strings")
    assert not any(tmp_path.glob("*out*"))


def test_float32_sinks_are_kept_as_stored(tiny, tmp_path: Path) -> None:
    src = with_tensors_cast(tiny("gpt-oss"), tmp_path / "src", ".self_attn.sinks", torch.float32)
    for backend in ("none", "dequant", "triton"):
        out = tmp_path / backend
        args = ("--arch", "sm90") if backend == "triton" else ()
        result = run_cli("convert", src, out, "--backend", backend, *args)
        assert result.returncode == 0, result.stderr
        records = load_manifest(out).tensors
        sinks = [name for name in records if name.endswith(".self_attn.sinks")]
        assert sinks and all(records[name].dtype == "F32" for name in sinks)
        stored = {k: v for shard in out.glob("model-*.safetensors") for k, v in load_file(shard).items()}
        original = {k: v for shard in src.glob("*.safetensors") for k, v in load_file(shard).items()}
        assert all(torch.equal(stored[name], original[name]) for name in sinks)


@pytest.mark.parametrize(
    ("backend", "arch"), [("none", "sm90"), ("triton", "sm90"), ("marlin", None), ("dequant", None), ("cpu", None)]
)
def test_float32_expert_biases_are_cast_as_vllm_loads_them(tiny, tmp_path: Path, backend: str, arch: str) -> None:
    """vLLM copies gpt-oss's expert biases into bf16 parameters: an F32 checkpoint converts to the bytes of the
    same checkpoint with its biases rounded to bf16 first, and the manifest says they were cast."""
    rng = torch.Generator().manual_seed(fresh_seed())
    bias = ".mlp.experts.gate_up_proj_bias", ".mlp.experts.down_proj_bias"
    as_f32 = with_tensors_cast(tiny("gpt-oss"), tmp_path / "f32", bias, torch.float32, jitter=rng)
    as_bf16 = with_tensors_cast(as_f32, tmp_path / "bf16", bias, torch.bfloat16)
    prepared = {}
    for name, src in (("f32", as_f32), ("bf16", as_bf16)):
        source, plan = load_plan(str(src), backend, options=PlanOptions(arch=arch))
        convert(source, plan, tmp_path / f"out-{name}")
        prepared[name] = {
            k: v for f in (tmp_path / f"out-{name}").glob("model-*.safetensors") for k, v in load_file(f).items()
        }
    assert prepared["f32"].keys() == prepared["bf16"].keys()
    assert all(torch.equal(prepared["f32"][k], prepared["bf16"][k]) for k in prepared["f32"])
    recipes = [record.recipe for _, record in load_manifest(tmp_path / "out-f32").all_tensor_records()]
    assert sum(recipe.endswith("+cast-f32-bf16") for recipe in recipes) == 2 * 2  # two biases in each of two layers
    assert not any("+cast" in record.recipe for _, record in load_manifest(tmp_path / "out-bf16").all_tensor_records())


def test_a_transformed_tensor_in_another_float_dtype_is_refused(tiny, tmp_path: Path) -> None:
    """Fused shared experts re-lay the shared expert out into slots: a float32 one is refused in one line."""
    src = with_tensors_cast(
        tiny("deepseek-v3"), tmp_path / "src", ".mlp.shared_experts.down_proj.weight", torch.float32
    )
    result = run_cli("convert", src, tmp_path / "out", "--fuse-shared-experts")
    assert_one_line_error(result, "shared_experts.down_proj is [weight F32]", "routed experts are [weight BF16]")
    assert not (tmp_path / "out").exists()


def test_bf16_correction_bias_converts_plain_and_fused(tiny, tmp_path: Path) -> None:
    suffix = ".mlp.gate.e_score_correction_bias"
    src = with_tensors_cast(tiny("deepseek-v3"), tmp_path / "src", suffix, torch.bfloat16)
    for name, args in (("plain", ()), ("fused", ("--fuse-shared-experts",))):
        result = run_cli("convert", src, tmp_path / name, *args)
        assert result.returncode == 0, result.stderr
        records = load_manifest(tmp_path / name).tensors
        assert {records[n].dtype for n in records if n.endswith(suffix)} == {"BF16"}


@pytest.mark.parametrize("family", ["deepseek-v3", "glm4-moe"])
def test_mtp_layer_converts_plain_and_fused_and_stays_as_stored(tmp_path: Path, family: str) -> None:
    src = build_fixture(family, tmp_path / "src", config_overrides={"num_nextn_predict_layers": 1})
    mtp = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    source = open_local(src)
    mtp_names = [n for n in source.tensor_names if n.startswith(f"model.layers.{mtp}.")]
    assert f"model.layers.{mtp}.eh_proj.weight" in mtp_names
    assert f"model.layers.{mtp}.mlp.shared_experts.down_proj.weight" in mtp_names
    assert build_plan(source).unknown_tensors == []  # the MTP layer is part of the family's inventory
    for name, args in (("plain", ()), ("fused", ("--fuse-shared-experts",))):
        result = run_cli("convert", src, tmp_path / name, *args)
        assert result.returncode == 0, result.stderr
        manifest = load_manifest(tmp_path / name)
        assert all(manifest.tensors[n].recipe == "passthrough" for n in mtp_names)
        stored = {k: v for shard in (tmp_path / name).glob("model-*.safetensors") for k, v in load_file(shard).items()}
        assert all(torch.equal(stored[n], source.read(n)) for n in mtp_names)
    contract = load_manifest(tmp_path / "fused").routing["fused_shared_experts"]
    assert contract["mtp_layers"] == [mtp] and "not fused" in contract["mtp_shared_experts"]


@pytest.mark.parametrize("family", ["deepseek-v3", "glm4-moe"])
def test_mtp_layers_the_checkpoint_does_not_store_are_absent(tmp_path: Path, family: str) -> None:
    """vLLM serves such a checkpoint's main model (MTP speculative decoding would need the weights): moeprep
    converts it, plain and fused, keeping config.json as it is."""
    pytest.importorskip("transformers")
    src = deepseek_style_by_transformers(family, tmp_path / "src", fresh_seed())
    config = json.loads((src / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    assert not any(name.startswith("model.layers.2.") for name in open_local(src).tensor_names)
    for name, args in (("plain", ()), ("fused", ("--fuse-shared-experts",))):
        result = run_cli("convert", src, tmp_path / name, *args)
        assert result.returncode == 0, result.stderr
        assert json.loads((tmp_path / name / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert load_manifest(tmp_path / "fused").routing["fused_shared_experts"]["mtp_layers"] == []


def test_an_mtp_layer_stored_in_part_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    src = build_fixture("deepseek-v3", tmp_path / "src", config_overrides={"num_nextn_predict_layers": 1})
    mtp = f"model.layers.{json.loads((src / 'config.json').read_text())['num_hidden_layers']}."
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    kept = f"{mtp}eh_proj.weight"
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        save_file({k: v for k, v in tensors.items() if not k.startswith(mtp) or k == kept}, src / shard)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(mtp) or k == kept}
    index_path.write_text(json.dumps(index))
    assert_one_line_error(run_cli("convert", src, tmp_path / "out"), f"'{mtp}", "the checkpoint is incomplete")
    assert not (tmp_path / "out").exists()
