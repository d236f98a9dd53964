"""``convert --tp N`` with an mxfp4 backend: each rank's file holds exactly the backend's layout of the parameters
vLLM 0.26's gpt-oss loader fills on that rank (``_load_weights_mxfp4``: ``cdiv(I/32, N)`` scale groups of
intermediate columns per rank, the last rank the rest; gate/up rows and down columns narrowed, the down bias
on rank 0 only; copied into zeros of vLLM's per-partition size ``round_up(I // N, multiple)``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moeprep.checkpoint.source import open_local
from moeprep.convert import convert, load_plan
from moeprep.errors import PreparedCheckpointMismatch
from moeprep.fixtures import build_fixture
from moeprep.layouts.mxfp4_experts import Mxfp4ExpertDims
from moeprep.layouts.padding import round_up
from moeprep.plan import PlanOptions, mxfp4_layout
from moeprep.schema.manifest import load_manifest
from tests.conftest import run_cli

INTER = 160  # 5 scale groups: at TP 2 rank 0 gets 96 columns, rank 1 gets 64
EXPERTS = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def gpt_oss_160(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture(
        "gpt-oss", tmp_path_factory.mktemp("src") / "gpt-oss", config_overrides={"intermediate_size": INTER}
    )


def vllm_rank_params(src: Path, rank: int, tp: int, hidden_padded: int, inter_padded: int) -> dict[str, torch.Tensor]:
    """What vLLM's gpt-oss loader leaves in rank ``rank``'s mxfp4 parameters (written from its source)."""
    source = open_local(src)
    hidden = source.config["hidden_size"]
    per_rank = -(-INTER // 32 // tp) * 32
    start, end = rank * per_rank, min((rank + 1) * per_rank, INTER)

    def read(name: str) -> torch.Tensor:
        return source.read(f"{EXPERTS}.{name}")

    experts = read("gate_up_proj_blocks").shape[0]
    loaded = {
        "w13_weight": read("gate_up_proj_blocks").view(experts, 2 * INTER, -1)[:, 2 * start : 2 * end],
        "w13_weight_scale": read("gate_up_proj_scales")[:, 2 * start : 2 * end],
        "w13_bias": read("gate_up_proj_bias")[:, 2 * start : 2 * end],
        "w2_weight": read("down_proj_blocks").view(experts, -1, INTER // 2)[..., start // 2 : end // 2],
        "w2_weight_scale": read("down_proj_scales")[..., start // 32 : end // 32],
        "w2_bias": read("down_proj_bias") if rank == 0 else torch.zeros_like(read("down_proj_bias")),
    }
    shapes = {
        "w13_weight": (experts, 2 * inter_padded, hidden_padded // 2),
        "w13_weight_scale": (experts, 2 * inter_padded, hidden_padded // 32),
        "w13_bias": (experts, 2 * inter_padded),
        "w2_weight": (experts, hidden_padded, inter_padded // 2),
        "w2_weight_scale": (experts, hidden_padded, inter_padded // 32),
        "w2_bias": (experts, hidden_padded),
    }
    params = {}
    for name, value in loaded.items():
        param = torch.zeros(shapes[name], dtype=value.dtype)
        param[tuple(slice(0, d) for d in value.shape)] = value
        params[name] = param
    assert hidden <= hidden_padded
    return params


SOURCE_OF = {
    "gate_up_proj_blocks": "w13_weight",
    "gate_up_proj_scales": "w13_weight_scale",
    "gate_up_proj_bias": "w13_bias",
    "down_proj_blocks": "w2_weight",
    "down_proj_scales": "w2_weight_scale",
    "down_proj_bias": "w2_bias",
}


@pytest.mark.parametrize(
    ("backend", "arch"),
    [("triton", "sm90"), ("marlin", "any"), ("flashinfer-trtllm", "sm100"), ("cpu", "any"), ("none", "sm90")],
)
def test_each_rank_file_holds_the_layout_of_what_vllm_loads_on_that_rank(
    gpt_oss_160: Path, tmp_path: Path, backend: str, arch: str
) -> None:
    tp = 2
    source, plan = load_plan(
        str(gpt_oss_160),
        backend,
        options=PlanOptions(
            arch=None if arch == "any" else arch,
            tp_size=tp,
            vllm_version="0.26.0" if backend == "flashinfer-trtllm" else None,  # its only verified release
        ),
    )
    out = tmp_path / "out"
    convert(source, plan, out)
    manifest = load_manifest(out)
    assert manifest.target.tp_size == tp and len(manifest.rank_tensors) == tp
    assert not any("experts.moeprep_" in name for name in manifest.tensors)  # no rank reads another's experts
    layout = mxfp4_layout(backend, "mxfp4")
    hidden_multiple, inter_multiple = layout.recipe_span(arch, plan.target.vllm_versions[-1])[1]
    hidden_padded = round_up(source.config["hidden_size"], hidden_multiple)
    inter_padded = round_up(INTER // tp, inter_multiple)
    dims = Mxfp4ExpertDims(0, hidden_padded, inter_padded, hidden_padded, inter_padded)
    for rank in range(tp):
        params = vllm_rank_params(gpt_oss_160, rank, tp, hidden_padded, inter_padded)
        records = manifest.rank_tensors[rank]
        for recipe in layout.prepared_expert_tensors(dims, arch):
            name = f"model.layers.1.{layout.experts_module}.{recipe.param}"
            record = records[name]
            assert record.file.startswith(f"model-rank-{rank}-") and record.recipe.endswith("+tp-shard")
            with safe_open(str(out / record.file), framework="pt") as f:
                stored = f.get_tensor(name)
            expected = recipe.transform(params[SOURCE_OF[recipe.source]])
            assert stored.dtype == expected.dtype and stored.shape == expected.shape, (rank, name)
            assert torch.equal(stored.view(torch.uint8), expected.contiguous().view(torch.uint8)), (rank, name)
    assert run_cli("verify", out).returncode == 0


def test_a_rank_share_larger_than_vllms_partition_is_refused(gpt_oss_160: Path, tmp_path: Path) -> None:
    # dequant does not pad: vLLM's per-partition parameters hold 160 // 2 = 80 columns, rank 0's share is 96
    result = run_cli("convert", gpt_oss_160, tmp_path / "out", "--backend", "dequant", "--tp", "2")
    assert result.returncode == 2 and "rank 0 would get 96" in result.stderr and "80" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["dequant", "triton", "marlin", "none"])
def test_expert_parallel_rank_files_hold_whole_experts_in_the_backend_layout(
    gpt_oss_160: Path, tmp_path: Path, backend: str
) -> None:
    """``--ep 3``: rank r's file holds the experts vLLM's linear placement gives it (the tiny gpt-oss has 8: 3, 3,
    2), each exactly as the single-partition folder lays it out (every layout is per expert), biases whole."""
    from moeprep.rank_shards import linear_placement

    whole, split = tmp_path / "whole", tmp_path / "ep3"
    for dest, extra in ((whole, []), (split, ["--ep", "3"])):
        result = run_cli("convert", gpt_oss_160, dest, "--backend", backend, *extra)
        assert result.returncode == 0, result.stderr
    manifest, whole_manifest = load_manifest(split), load_manifest(whole)
    experts = open_local(gpt_oss_160).config["num_local_experts"]
    layer_params = {n for n in whole_manifest.tensors if n.startswith(EXPERTS.replace(".mlp.experts", ".mlp."))}
    layer_params = {n for n in layer_params if whole_manifest.tensors[n].recipe != "passthrough"}
    assert layer_params and not layer_params & set(manifest.tensors)
    for rank, records in enumerate(manifest.rank_tensors):
        placed = linear_placement(experts, 3, rank)
        assert layer_params <= set(records)
        with (
            safe_open(split / records[next(iter(layer_params))].file, "pt") as part,
            safe_open(whole / whole_manifest.tensors[next(iter(layer_params))].file, "pt") as full,
        ):
            for name in layer_params:
                expected = full.get_tensor(name)[placed.start : placed.stop]
                assert torch.equal(part.get_tensor(name).view(torch.uint8), expected.view(torch.uint8)), (rank, name)
                assert records[name].shape == [len(placed), *whole_manifest.tensors[name].shape[1:]], name
    assert run_cli("verify", split).returncode == 0


def test_the_runtime_serves_tensor_parallel_mxfp4_only_through_dequant(tiny, tmp_path: Path) -> None:
    from moeprep.runtime.quant_config import check_rank_tensors

    for backend in ("triton", "dequant"):
        source, plan = load_plan(str(tiny("gpt-oss")), backend, options=PlanOptions(tp_size=2))
        convert(source, plan, tmp_path / backend)
    with pytest.raises(PreparedCheckpointMismatch, match="tensor-parallel triton layouts .* not verified"):
        check_rank_tensors(load_manifest(tmp_path / "triton"), expert_parallel=False, on_cpu=False)
    check_rank_tensors(load_manifest(tmp_path / "dequant"), expert_parallel=False, on_cpu=True)  # served (e2e)
    with pytest.raises(PreparedCheckpointMismatch, match="without --enable-expert-parallel"):
        check_rank_tensors(load_manifest(tmp_path / "dequant"), expert_parallel=True, on_cpu=True)
