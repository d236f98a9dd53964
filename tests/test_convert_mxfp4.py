"""``convert --backend triton|marlin|dequant`` on a gpt-oss fixture: every prepared tensor equals its layout
function applied to the whole (padded) source tensor, although conversion streams expert chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprep.checkpoint.source import open_local
from moeprep.jobs import CHUNK_BYTES
from moeprep.layouts import cpu_amx, flashinfer_trtllm, marlin, triton_blackwell, triton_hopper
from moeprep.layouts.padding import pad_to, round_up
from tests.conftest import run_cli

EXPERTS = "model.layers.1.mlp.experts"


def expected_tensors(src: Path, backend: str, arch: str) -> dict[str, torch.Tensor]:
    """Independent composition of padding + layout for layer 1 of the fixture."""
    source = open_local(src)
    hidden, inter = source.config["hidden_size"], source.config["intermediate_size"]
    h_mult, i_mult = {
        ("marlin", "any"): (256, 128),
        ("triton", "sm90"): (1, 64),
        ("triton", "sm100"): (1, 64),
        ("dequant", "any"): (1, 1),
        ("cpu", "any"): (32, 32),
        ("none", "sm90"): (1, 64),
        ("none", "sm100"): (256, 256),
        ("flashinfer-trtllm", "sm100"): (256, 256),
    }[backend, arch]
    h, i = round_up(hidden, h_mult), round_up(inter, i_mult)
    out = {}
    for proj, rows, k in (("w13", 2 * i, h), ("w2", h, i)):
        name = "gate_up_proj" if proj == "w13" else "down_proj"
        blocks = source.read(f"{EXPERTS}.{name}_blocks")
        blocks = pad_to(blocks.reshape(blocks.shape[0], blocks.shape[1], -1), (blocks.shape[0], rows, k // 2))
        scales = pad_to(source.read(f"{EXPERTS}.{name}_scales"), (blocks.shape[0], rows, k // 32))
        bias = pad_to(source.read(f"{EXPERTS}.{name}_bias"), (blocks.shape[0], rows))
        if backend in ("dequant", "none"):  # the checkpoint's bytes in vLLM's (padded) mxfp4 parameters
            out.update(
                {f"moeprep_{proj}_weight": blocks, f"moeprep_{proj}_scale": scales, f"moeprep_{proj}_bias": bias}
            )
            continue
        if backend == "cpu":
            out.update(
                {
                    f"moeprep_{proj}_weight": cpu_amx.pack_cpu_weight(blocks),
                    f"moeprep_{proj}_scale": cpu_amx.pack_cpu_scale(scales),
                    f"moeprep_{proj}_bias": bias.float(),
                }
            )
            continue
        if backend == "flashinfer-trtllm":
            swap = proj == "w13"
            out[f"moeprep_{proj}_weight"] = flashinfer_trtllm.shuffle_rows(blocks, swap)
            scale = flashinfer_trtllm.interleave_block_scales(flashinfer_trtllm.shuffle_rows(scales, swap))
            out[f"moeprep_{proj}_scale"] = scale.view(torch.float8_e4m3fn)
            out[f"moeprep_{proj}_bias"] = flashinfer_trtllm.shuffle_rows(bias.float(), swap)
            continue
        if backend == "marlin":
            out[f"moeprep_{proj}_weight"] = marlin.repack_marlin_weight(blocks)
            out[f"moeprep_{proj}_scale"] = marlin.permute_marlin_scales(scales)
            out[f"moeprep_{proj}_bias"] = marlin.permute_marlin_bias(bias)
            continue
        layout = triton_hopper if arch == "sm90" else triton_blackwell
        kind = "hopper" if arch == "sm90" else "blackwell"
        out[f"moeprep_{proj}_value"] = getattr(layout, f"swizzle_{kind}_value")(blocks)
        out[f"moeprep_{proj}_scale"] = getattr(layout, f"swizzle_{kind}_scale")(scales)
        out[f"moeprep_{proj}_bias"] = bias.float()
    return out


@pytest.mark.parametrize(
    ("backend", "arch"),
    [
        ("triton", "sm90"),
        ("triton", "sm100"),
        ("marlin", "any"),
        ("flashinfer-trtllm", "sm100"),
        ("dequant", "any"),
        ("cpu", "any"),
        ("none", "sm90"),
        ("none", "sm100"),
    ],
)
def test_prepared_tensors_equal_the_layout_of_the_whole_tensor(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, arch: str
) -> None:
    src = tiny("gpt-oss")
    monkeypatch.setattr("moeprep.jobs.CHUNK_BYTES", 64 * 1024)  # several expert chunks per tensor
    assert CHUNK_BYTES > 64 * 1024
    from moeprep.convert import convert, load_plan
    from moeprep.plan import PlanOptions

    # flashinfer-trtllm layouts are verified for vLLM 0.26.0 only (newer releases pad and shuffle differently)
    version = "0.26.0" if backend == "flashinfer-trtllm" else None
    options = PlanOptions(arch=None if arch == "any" else arch, vllm_version=version)
    source, plan = load_plan(str(src), backend, options=options)
    assert plan.target.recipe == f"{backend}-{arch}"
    convert(source, plan, tmp_path / "out")
    stored = {}
    for shard in (tmp_path / "out").glob("model-*.safetensors"):
        stored.update(load_file(shard))
    for param, expected in expected_tensors(src, backend, arch).items():
        got = stored[f"model.layers.1.mlp.experts.routed_experts.{param}"]
        assert got.dtype == expected.dtype and got.shape == expected.shape, param
        assert torch.equal(got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), param
    manifest = json.loads((tmp_path / "out" / "moeprep.json").read_text())
    assert manifest["target"]["backend"] == backend and manifest["target"]["knobs"]["arch"] == arch
    assert not any(name.endswith("_blocks") for name in stored)  # every mxfp4 source tensor was consumed
    assert run_cli("verify", tmp_path / "out").returncode == 0


def test_mxfp4_scales_of_the_wrong_length_are_refused(tiny, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    src = shutil.copytree(tiny("gpt-oss"), tmp_path / "src")
    victim = f"{EXPERTS}.down_proj_scales"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"][victim]
    tensors = load_file(shard)
    tensors[victim] = tensors[victim][..., :-1].contiguous()  # one 32-element group short
    save_file(tensors, shard)
    result = run_cli("convert", src, tmp_path / "out", "--backend", "triton")
    assert result.returncode == 2 and victim in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_backend_none_pads_mxfp4_experts_for_the_default_kernel_of_its_arch(tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("gpt-oss"), tmp_path / "out", "--backend", "none")
    assert result.returncode == 0, result.stderr
    target = json.loads((tmp_path / "out" / "moeprep.json").read_text())["target"]
    assert target["recipe"] == "none-sm90" and target["padding"] == {"hidden": 1, "intermediate": 64}
    refused = run_cli("convert", tiny("gpt-oss"), tmp_path / "other", "--backend", "none", "--arch", "sm80")
    assert refused.returncode == 2 and "--arch sm90, sm100" in refused.stderr and not (tmp_path / "other").exists()


def test_backend_for_mxfp4_refuses_bf16_experts(tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("glm4-moe"), tmp_path / "out", "--backend", "marlin")
    assert result.returncode == 2 and "use --backend none" in result.stderr


def test_layouts_are_prepared_for_the_vllm_releases_their_recipe_covers(tiny, tmp_path: Path) -> None:
    """The manifest records the vLLM ranges whose transform gives the layout's bytes; the sm100 padding-only
    recipe follows the targeted release (vLLM 0.27 pads the intermediate size to 128, 0.26 to 256); a release
    outside a recipe's ranges is refused in one line, without output."""
    from moeprep.schema.manifest import load_manifest

    expected = {
        ("triton", "0.30.0"): ([["0.26.0", "0.34.0"]], 64),
        ("none", "0.26.0"): ([["0.26.0", "0.26.0"]], 256),
        ("none", "0.34.0"): ([["0.27.0", "0.34.0"]], 128),
        ("marlin", "0.34.0"): ([["0.26.0", "0.26.0"], ["0.34.0", "0.34.0"]], 128),
    }
    for (backend, version), (ranges, intermediate) in expected.items():
        out = tmp_path / f"{backend}-{version}"
        arch = ["--arch", "sm100"] if backend == "none" else []
        result = run_cli("convert", tiny("gpt-oss"), out, "--backend", backend, "--vllm-version", version, *arch)
        assert result.returncode == 0, result.stderr
        target = load_manifest(out).target
        assert (target.vllm_ranges, target.padding["intermediate"]) == (ranges, intermediate), backend
    for backend, version in (("marlin", "0.30.0"), ("flashinfer-trtllm", "0.34.0"), ("triton", "0.35")):
        result = run_cli("convert", tiny("gpt-oss"), tmp_path / "no", "--backend", backend, "--vllm-version", version)
        assert result.returncode == 2 and "layouts are verified for vLLM" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
    bad = run_cli("convert", tiny("gpt-oss"), tmp_path / "bad", "--backend", "triton", "--vllm-version", "latest")
    assert bad.returncode == 2 and "not of the form X.Y.Z" in bad.stderr


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--backend", "flashinfer-trtllm", "--vllm-version", "0.26.0"], "Blackwell"),
        (["--backend", "cpu", "--ep", "2"], "expert-parallel cpu layouts"),
        (["--backend", "triton", "--tp", "2"], "tensor-parallel triton layouts"),
    ],
)
def test_folders_the_plugin_does_not_serve_yet_say_why_instead_of_a_serve_command(
    tiny, tmp_path: Path, extra: list[str], reason: str
) -> None:
    result = run_cli("convert", tiny("gpt-oss"), tmp_path / "out", *extra)
    assert result.returncode == 0, result.stderr
    printed = " ".join(result.stdout.split())
    assert "does not serve it yet" in printed and reason in printed and "serve with" not in printed
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Not served by the moeprep plugin yet" in card and reason in card and "vllm serve" not in card
