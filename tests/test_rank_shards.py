"""``convert --tp N`` / ``--ep N``: each rank's files hold exactly vLLM's tensor-parallel slices of every routed
expert (gate/up rows, down columns), or under expert parallelism the whole experts vLLM's linear placement
gives that rank; the index lists only the replicated shards, verify covers every rank's bytes, and what
cannot be split per rank is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeprep.checkpoint.source import open_local
from moeprep.fixtures import build_fixture
from moeprep.rank_shards import SpreadSlotPlacement, linear_placement
from moeprep.schema.manifest import load_manifest
from moeprep.schema.routing import FusedSharedExperts
from tests.conftest import fresh_seed, run_cli


@pytest.mark.parametrize(("family", "tp"), [("glm4-moe", 2), ("qwen2-moe", 4), ("deepseek-v3", 2)])
def test_rank_files_hold_vllm_tensor_parallel_slices(tmp_path: Path, family: str, tp: int) -> None:
    source = build_fixture(family, tmp_path / "src", seed=fresh_seed(3))
    dest = tmp_path / "tp"
    result = run_cli("convert", source, dest, "--tp", str(tp))
    assert result.returncode == 0, result.stderr
    assert f"--tensor-parallel-size {tp}" in " ".join(result.stdout.split())
    manifest = load_manifest(dest)
    assert manifest.target.tp_size == tp and len(manifest.rank_tensors) == tp
    index = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("rank" in file for file in index.values())
    original = open_local(source)
    expert_names = {name for name in original.tensor_names if ".mlp.experts." in name}
    assert expert_names and not expert_names & set(manifest.tensors)  # no rank reads another's experts
    for rank, records in enumerate(manifest.rank_tensors):
        assert set(records) == expert_names
        assert {r.file for r in records.values()} == {f"model-rank-{rank}-part-00001.safetensors"}
        stored = load_file(dest / f"model-rank-{rank}-part-00001.safetensors")
        for name in expert_names:
            full = original.read(name)
            dim = 1 if name.endswith("down_proj.weight") else 0
            width = full.shape[dim] // tp
            assert torch.equal(stored[name], full.narrow(dim, rank * width, width)), (rank, name)
    assert run_cli("verify", dest).returncode == 0
    shown = " ".join(run_cli("inspect", dest).stdout.split())
    assert f"TP {tp}" in shown and f"of them {tp * len(expert_names)} in per-rank files" in shown


@pytest.mark.parametrize(("family", "ep"), [("glm4-moe", 2), ("qwen2-moe", 3)])
def test_expert_parallel_rank_files_hold_whole_experts_of_linear_placement(
    tmp_path: Path, family: str, ep: int
) -> None:
    source = build_fixture(family, tmp_path / "src", seed=fresh_seed(3))
    dest = tmp_path / "ep"
    result = run_cli("convert", source, dest, "--ep", str(ep))
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(dest)
    assert (manifest.target.ep_size, manifest.target.tp_size, len(manifest.rank_tensors)) == (ep, 1, ep)
    original = open_local(source)
    config = json.loads((source / "config.json").read_text())
    experts = config.get("n_routed_experts") or config["num_experts"]
    seen = set()
    for rank, records in enumerate(manifest.rank_tensors):
        stored = load_file(dest / f"model-rank-{rank}-part-00001.safetensors")
        owned = {int(name.split(".experts.")[1].split(".")[0]) for name in records}
        assert owned == set(linear_placement(experts, ep, rank))
        for name in records:
            assert torch.equal(stored[name], original.read(name))
        seen |= set(records)
    assert seen == {name for name in original.tensor_names if ".mlp.experts." in name}
    assert run_cli("verify", dest).returncode == 0
    printed = " ".join(result.stdout.split())
    assert "serving per-rank expert-parallel folders (convert --ep) on GPUs is not verified yet" in printed
    assert f"vLLM CPU serves them: --tensor-parallel-size {ep} --enable-expert-parallel" in printed
    from moeprep.modelcard import serve_command

    assert f"--tensor-parallel-size {ep} --enable-expert-parallel" in serve_command("x", manifest.target, {})
    pytest.importorskip("vllm")
    from moeprep.errors import PreparedCheckpointMismatch
    from moeprep.runtime.quant_config import check_rank_tensors

    check_rank_tensors(manifest, expert_parallel=True, on_cpu=True)  # served by vLLM CPU (tests/e2e)
    with pytest.raises(PreparedCheckpointMismatch, match="on GPUs is not verified yet"):
        check_rank_tensors(manifest, expert_parallel=True, on_cpu=False)


@pytest.mark.parametrize(("family", "replicas"), [("deepseek-v3", "1"), ("qwen2-moe", "2")])
def test_fused_shared_slots_are_sliced_per_rank_like_routed_experts(tmp_path: Path, family: str, replicas: str) -> None:
    """``--tp 2 --fuse-shared-experts``: each rank file holds its slice of every slot (gate/up rows, down
    columns) of the single-partition fused folder, bitwise; the router (Qwen2-MoE's widened gate) stays
    replicated."""
    source = build_fixture(family, tmp_path / "src", seed=fresh_seed(3))
    whole, split = tmp_path / "fused", tmp_path / "fused-tp2"
    assert run_cli("convert", source, whole, f"--fuse-shared-experts={replicas}").returncode == 0
    result = run_cli("convert", source, split, f"--fuse-shared-experts={replicas}", "--tp", "2")
    assert result.returncode == 0, result.stderr
    whole_manifest, manifest = load_manifest(whole), load_manifest(split)
    slots = {name for name, r in whole_manifest.tensors.items() if r.recipe != "passthrough" and ".experts." in name}
    assert slots and not slots & set(manifest.tensors)
    full = {name: t for f in whole.glob("model-0*.safetensors") for name, t in load_file(f).items()}
    for rank, records in enumerate(manifest.rank_tensors):
        stored = load_file(split / f"model-rank-{rank}-part-00001.safetensors")
        assert slots <= set(records)
        for name in slots:
            dim = 1 if name.endswith("down_proj.weight") else 0
            width = full[name].shape[dim] // 2
            assert torch.equal(stored[name], full[name].narrow(dim, rank * width, width)), (rank, name)
    for name, record in manifest.tensors.items():  # everything else as in the single-partition folder
        assert record.sha256_tree == whole_manifest.tensors[name].sha256_tree, name
    assert run_cli("verify", split).returncode == 0


@pytest.mark.parametrize(
    ("routed", "slots", "replicas", "ep"), [(8, 1, 2, 2), (8, 2, 4, 2), (12, 1, 6, 3), (256, 1, 8, 8)]
)
def test_spread_slot_placement_gives_every_rank_its_routed_experts_and_a_share_of_every_slot(
    routed: int, slots: int, replicas: int, ep: int
) -> None:
    placement = SpreadSlotPlacement.checked(routed, slots, replicas, ep)
    total = routed + slots * replicas
    ids = [placement.global_id(e) for e in range(total)]
    assert sorted(ids) == list(range(total))  # a renaming of the layer's experts
    contract = placement.spread(
        FusedSharedExperts.of(routed, slots, replicas, top_k=2, expert_intermediate=8, gated=False)
    )
    for rank in range(ep):
        block = range(rank * total // ep, (rank + 1) * total // ep)  # what vLLM's linear placement gives the rank
        assert list(block) == list(linear_placement(total, ep, rank))
        assert sum(g in block for g in contract.routed_ids) == routed // ep
        for replicas_of_slot in contract.slot_ids:
            assert sum(g in block for g in replicas_of_slot) == replicas // ep
    tokens_per_rank = [0] * ep  # token t takes replica t % replicas: each rank runs the shared expert as often
    for token in range(replicas * 5):
        tokens_per_rank[contract.slot_ids[0][token % replicas] // (total // ep)] += 1
    assert len(set(tokens_per_rank)) == 1


def test_ep_fused_rank_files_hold_their_replicas_under_the_layer_ids(tiny, tmp_path: Path) -> None:
    """``--ep 2 --fuse-shared-experts=2`` on GLM-4-MoE (8 routed experts): rank r holds routed experts
    ``4r..4r+3`` as layer experts ``5r..5r+3`` and one replica of the shared expert as expert ``5r+4``, bitwise
    the single-partition fused folder's; the contract maps the router's ids to those."""
    whole, split = tmp_path / "fused", tmp_path / "fused-ep2"
    assert run_cli("convert", tiny("glm4-moe"), whole, "--fuse-shared-experts=2").returncode == 0
    result = run_cli("convert", tiny("glm4-moe"), split, "--fuse-shared-experts=2", "--ep", "2")
    assert result.returncode == 0, result.stderr
    full = {name: t for f in whole.glob("model-0*.safetensors") for name, t in load_file(f).items()}
    manifest = load_manifest(split)
    contract = manifest.routing["fused_shared_experts"]
    assert contract["routed_ids"] == [0, 1, 2, 3, 5, 6, 7, 8] and contract["slot_ids"] == [[4, 9]]
    layer = "model.layers.1.mlp.experts"  # the fixture's first MoE layer
    for rank, records in enumerate(manifest.rank_tensors):
        stored = load_file(split / f"model-rank-{rank}-part-00001.safetensors")
        for checkpoint_id, layer_id in [*((4 * rank + i, 5 * rank + i) for i in range(4)), (8 + rank, 5 * rank + 4)]:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"{layer}.{layer_id}.{proj}.weight"
                assert torch.equal(stored[name], full[f"{layer}.{checkpoint_id}.{proj}.weight"]), (rank, name)
        assert {int(n.split(".experts.")[1].split(".")[0]) for n in records} == set(range(5 * rank, 5 * rank + 5))
    assert run_cli("verify", split).returncode == 0


def test_linear_placement_is_vllms() -> None:
    vllm_maps = pytest.importorskip("vllm.model_executor.layers.fused_moe.expert_map_manager")
    for experts, ep in ((8, 2), (8, 3), (60, 7), (256, 16), (5, 5)):
        for rank in range(ep):
            _, expert_map, _ = vllm_maps.determine_expert_map(ep, rank, experts)
            assert list(linear_placement(experts, ep, rank)) == (expert_map >= 0).nonzero().flatten().tolist()


def test_verify_names_a_flipped_byte_in_a_rank_file(tiny, tmp_path: Path) -> None:
    dest = tmp_path / "tp"
    assert run_cli("convert", tiny("glm4-moe"), dest, "--tp", "2").returncode == 0
    rank_file = dest / "model-rank-1-part-00001.safetensors"
    data = bytearray(rank_file.read_bytes())
    data[-100] ^= 1
    rank_file.write_bytes(bytes(data))
    result = run_cli("verify", dest)
    assert result.returncode == 2 and "model-rank-1-part-00001.safetensors" in result.stderr


@pytest.mark.parametrize(
    ("family", "extra", "message"),
    [
        ("glm4-moe", ["--tp", "3"], "does not split into 3 equal parts"),
        ("gpt-oss", ["--tp", "4", "--backend", "triton"], "rank 3 would get 0 of the experts' 192"),
        ("glm4-moe", ["--ep", "2", "--fuse-shared-experts"], "use a replica count that is a multiple of 2"),
        ("mixtral", ["--tp", "2"], "no mlp.experts"),
        ("llama4", ["--tp", "2"], "3-D expert tensors are not split per rank yet"),
        ("glm4-moe", ["--ep", "9"], "the model has only 8 experts"),
        ("glm4-moe", ["--ep", "3", "--tp", "2"], "a multiple of the TP size"),
        ("gpt-oss", ["--ep", "9", "--backend", "marlin"], "the model has only 8 experts"),
        ("gpt-oss", ["--ep", "3", "--tp", "2", "--backend", "dequant"], "a multiple of the TP size"),
        ("llama4", ["--ep", "2"], "3-D expert tensors are not split per rank yet"),
    ],
)
def test_what_cannot_be_split_per_rank_is_refused(tiny, tmp_path: Path, family: str, extra: list, message: str) -> None:
    result = run_cli("convert", tiny(family), tmp_path / "out", *extra)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def fp8_deepseek(tmp_path: Path, moe_intermediate: int) -> Path:
    return build_fixture(
        "deepseek-v3",
        tmp_path / f"fp8-{moe_intermediate}",
        seed=fresh_seed(3),
        quantization="fp8-block",
        config_overrides={"moe_intermediate_size": moe_intermediate},
    )


@pytest.mark.parametrize("fuse", [False, True], ids=["routed", "fused-slots"])
def test_block_fp8_rank_files_hold_weight_slices_with_their_block_scales(tmp_path: Path, fuse: bool) -> None:
    """DeepSeek-V3 FP8 at TP 2, moe_intermediate 256: each rank gets 128 gate/up rows (one 128-row block of
    scales) and 128 down columns (one block column), routed experts and fused shared-expert slots alike, as
    vLLM's block-fp8 MoE loader narrows weights and ``weight_scale_inv`` per rank."""
    source = fp8_deepseek(tmp_path, 256)
    extra = ["--fuse-shared-experts"] if fuse else []
    whole, dest = tmp_path / "whole", tmp_path / "tp"
    for out, tp in ((whole, []), (dest, ["--tp", "2"])):
        result = run_cli("convert", source, out, *extra, *tp)
        assert result.returncode == 0, result.stderr
    single = {}
    for shard in whole.glob("model-*.safetensors"):
        single.update(load_file(shard))
    manifest = load_manifest(dest)
    scales = [name for name in manifest.rank_tensors[0] if name.endswith("weight_scale_inv")]
    assert scales and len(scales) * 2 == len(manifest.rank_tensors[0])
    for rank, records in enumerate(manifest.rank_tensors):
        stored = load_file(dest / f"model-rank-{rank}-part-00001.safetensors")
        for name in records:
            full = single[name]
            dim = 1 if ".down_proj." in name else 0
            width = full.shape[dim] // 2
            assert width == (1 if name.endswith("weight_scale_inv") else 128), name
            assert torch.equal(stored[name].view(torch.uint8), full.narrow(dim, rank * width, width).view(torch.uint8))
    from moeprep.errors import PreparedCheckpointMismatch
    from moeprep.runtime.quant_config import check_rank_tensors

    with pytest.raises(PreparedCheckpointMismatch, match="block-fp8 expert shards is not verified"):
        check_rank_tensors(manifest, expert_parallel=False, on_cpu=True)


def test_block_fp8_shares_that_are_not_whole_blocks_are_refused(tmp_path: Path) -> None:
    result = run_cli("convert", fp8_deepseek(tmp_path, 128), tmp_path / "out", "--tp", "2")
    assert result.returncode == 2 and "64 intermediate columns are not whole fp8 blocks of 128" in result.stderr
    assert not (tmp_path / "out").exists()
