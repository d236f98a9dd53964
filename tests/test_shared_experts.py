"""``convert --fuse-shared-experts``: slots that add up to the shared expert, the routing contract, refusals;
and the runtime's slot router on vLLM CPU."""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moeprep.checkpoint.source import open_local
from moeprep.cli.app import bare_flag_as_one_replica
from moeprep.errors import UnsupportedModelError
from moeprep.families.fp8_block import DEEPSEEK_FP8_CONFIG
from moeprep.fixtures import build_fixture
from moeprep.jobs import padded_chunk
from moeprep.plan import PlanOptions
from moeprep.schema.routing import FusedSharedExperts
from tests.conftest import fresh_seed, run_cli

SHARED_MODULE = {"glm4-moe": "shared_experts", "deepseek-v3": "shared_experts", "qwen2-moe": "shared_expert"}


def swiglu(x: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    gate, up, down = (dequantized_weight(weights, f"{prefix}.{p}_proj") for p in ("gate", "up", "down"))
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def dequantized_weight(weights: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """``module``'s weight in float64; block-fp8 weights times their 128 x 128 block scales."""
    weight = weights[f"{module}.weight"].double()
    scale = weights.get(f"{module}.weight_scale_inv")
    if scale is None:
        return weight
    rows, cols = weight.shape
    return weight * scale.double().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


def converted(source: Path, dest: Path, replicas: int) -> tuple[dict[str, torch.Tensor], dict]:
    result = run_cli("convert", source, dest, f"--fuse-shared-experts={replicas}")
    assert result.returncode == 0, result.stderr
    assert run_cli("verify", dest).returncode == 0
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(dest.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors, json.loads((dest / "moeprep.json").read_text())


@pytest.mark.parametrize(
    ("family", "replicas", "overrides", "slots", "quantization"),
    [
        ("glm4-moe", 1, None, 1, "none"),
        ("deepseek-v3", 3, None, 1, "none"),
        ("qwen2-moe", 2, None, 2, "none"),  # shared 128 = two slots of 64
        ("qwen2-moe", 1, {"shared_expert_intermediate_size": 96}, 2, "none"),  # second slot zero-padded
        ("deepseek-v3", 1, {"n_shared_experts": 2}, 2, "none"),  # DeepSeek-V2-style two merged shared experts
        ("deepseek-v3", 2, {"n_shared_experts": 2}, 2, "fp8-block"),  # weights and block scales split exactly
        ("glm4-moe", 1, None, 1, "fp8-block"),
    ],
)
def test_slots_add_up_to_the_shared_expert(
    tmp_path: Path, family: str, replicas: int, overrides: dict | None, slots: int, quantization: str
) -> None:
    seed = fresh_seed(3)
    source = build_fixture(family, tmp_path / "src", seed=seed, config_overrides=overrides, quantization=quantization)
    original = open_local(source)
    tensors, manifest = converted(source, tmp_path / "fused", replicas)
    contract = manifest["routing"]["fused_shared_experts"]
    experts = contract["routed_experts"]
    assert (contract["slots"], contract["replicas"], contract["num_experts"]) == (
        slots,
        replicas,
        experts + slots * replicas,
    )
    assert contract["fused_top_k"] == contract["top_k"] + slots
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["architectures"] == [contract["architecture"]]
    assert not any(SHARED_MODULE[family] in name for name in tensors), "shared expert tensors must be consumed"
    shown = " ".join(run_cli("inspect", tmp_path / "fused").stdout.split())
    assert f"{slots} slot(s) x {replicas} replica(s) after {experts} routed experts" in shown

    x = torch.randn(5, config["hidden_size"], dtype=torch.float64)
    for layer in manifest_moe_layers(manifest):
        mlp = f"model.layers.{layer}.mlp"
        shared = {
            name: original.read(name)
            for name in original.tensor_names
            if name.startswith(f"{mlp}.{SHARED_MODULE[family]}.")
        }
        expected = swiglu(x, shared, f"{mlp}.{SHARED_MODULE[family]}")
        fused = sum(swiglu(x, tensors, f"{mlp}.experts.{ids[0]}") for ids in contract["slot_ids"])
        torch.testing.assert_close(fused, expected, rtol=1e-9, atol=1e-12)
        suffixes = ("weight", "weight_scale_inv") if quantization == "fp8-block" else ("weight",)
        for ids in contract["slot_ids"]:
            for replica, proj, suffix in itertools.product(ids[1:], ("gate_proj", "up_proj", "down_proj"), suffixes):
                slot, copy = (tensors[f"{mlp}.experts.{e}.{proj}.{suffix}"] for e in (ids[0], replica))
                assert torch.equal(copy.view(torch.uint8), slot.view(torch.uint8))
        for e, suffix in itertools.product(range(experts), suffixes):  # routed experts pass through bitwise
            name = f"{mlp}.experts.{e}.down_proj.{suffix}"
            assert torch.equal(tensors[name].view(torch.uint8), original.read(name).view(torch.uint8))
        if family == "qwen2-moe":
            gate = tensors[f"{mlp}.gate.weight"]
            assert torch.equal(gate[:experts], original.read(f"{mlp}.gate.weight"))
            assert torch.equal(gate[experts:], original.read(f"{mlp}.shared_expert_gate.weight"))
            assert contract["slot_weight"] == "sigmoid(shared_expert_gate(x))"


def manifest_moe_layers(manifest: dict) -> list[int]:
    return sorted(
        {int(name.split(".")[2]) for name, r in manifest["tensors"].items() if r["recipe"] == "shared-expert-slot"}
    )


@pytest.mark.parametrize(("replicas", "overrides"), [(2, None), (1, {"intermediate_size": 48})])
def test_llama4_slots_are_appended_to_the_3d_experts(tmp_path: Path, replicas: int, overrides: dict | None) -> None:
    """Llama 4 (3-D experts, router weight on the input): gate_up_proj [E+R, H, 2I] and down_proj [E+R, I, H]
    end with the shared expert in that layout (gate half first), once per replica; routed experts unchanged;
    the contract says the slots run on their own token rows, top-1."""
    seed = fresh_seed(3)
    source = build_fixture("llama4", tmp_path / "src", seed=seed, config_overrides=overrides)
    tensors, manifest = converted(source, tmp_path / "fused", replicas)
    original = open_local(source)
    contract = manifest["routing"]["fused_shared_experts"]
    experts = contract["routed_experts"]
    assert contract["router_weight_on_input"] and contract["fused_top_k"] == 1
    assert contract["slot_ids"] == [list(range(experts, experts + replicas))]
    for layer in range(json.loads((source / "config.json").read_text())["num_hidden_layers"]):
        ff = f"model.layers.{layer}.feed_forward"
        gate_up, down = tensors[f"{ff}.experts.gate_up_proj"], tensors[f"{ff}.experts.down_proj"]
        assert gate_up.shape[0] == down.shape[0] == experts + replicas
        assert torch.equal(gate_up[:experts], original.read(f"{ff}.experts.gate_up_proj"))
        assert torch.equal(down[:experts], original.read(f"{ff}.experts.down_proj"))
        shared = {p: original.read(f"{ff}.shared_expert.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")}
        for r in range(replicas):  # as transformers' Llama4TextExperts computes an expert
            slot_gate_up, slot_down = gate_up[experts + r], down[experts + r]
            assert torch.equal(slot_gate_up, torch.cat([shared["gate_proj"], shared["up_proj"]]).T)
            assert torch.equal(slot_down, shared["down_proj"].T)
        assert not any(name.startswith(f"{ff}.shared_expert.") for name in tensors)


def test_padded_chunk_pads_past_the_end_with_zeros() -> None:
    t = torch.randn(3, 10)
    assert torch.equal(padded_chunk(t, 0, 4, -1), t[:, :4])
    assert torch.equal(padded_chunk(t, 2, 4, -1), torch.cat([t[:, 8:], torch.zeros(3, 2)], 1))
    assert torch.equal(padded_chunk(t.T, 1, 4, 0), t.T[4:8])


@pytest.mark.parametrize(
    ("family", "backend", "message"),
    [
        ("qwen3-moe", "none", "has no shared experts"),
        ("mixtral", "none", "has no shared experts"),
        ("gpt-oss", "dequant", "has no shared experts"),
    ],
)
def test_families_without_fusable_shared_experts_are_refused(
    tiny, tmp_path: Path, family: str, backend: str, message: str
) -> None:
    result = run_cli("convert", tiny(family), tmp_path / "out", "--backend", backend, "--fuse-shared-experts")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bare_flag_means_one_replica() -> None:
    assert bare_flag_as_one_replica(["a", "b", "--fuse-shared-experts"])[-1] == "--fuse-shared-experts=1"
    assert bare_flag_as_one_replica(["--fuse-shared-experts", "--dry-run"])[:1] == ["--fuse-shared-experts=1"]
    assert bare_flag_as_one_replica(["--fuse-shared-experts", "3"]) == ["--fuse-shared-experts", "3"]
    assert bare_flag_as_one_replica(["--", "--fuse-shared-experts"]) == ["--", "--fuse-shared-experts"]


@pytest.mark.parametrize(
    ("flag", "replicas"),
    [(["--fuse-shared-experts"], 1), (["--fuse-shared-experts", "2"], 2), (["--fuse-shared-experts=3"], 3), ([], 0)],
)
def test_the_convert_command_reads_the_optional_replica_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: list[str], replicas: int
) -> None:
    """In process, as ``python -m moeprep`` runs it: the command's own parsing reads the bare flag as one replica,
    before or after the positional arguments."""
    seen = []

    def planned(src: str, backend: str, revision: str | None, options: PlanOptions, headers_only: bool):
        seen.append(options.fuse_shared_replicas)
        raise UnsupportedModelError("stop after parsing")

    monkeypatch.setattr("moeprep.convert.load_plan", planned)
    for args in ([*flag, "SRC", str(tmp_path / "out")], ["SRC", str(tmp_path / "out"), *flag]):
        result = run_cli("convert", *args, "--dry-run")
        assert result.returncode == 2 and "stop after parsing" in result.stderr, result.stderr
    assert seen == [replicas, replicas]


def top2_slot_contract(routed_experts: int, slots: int, replicas: int, gated: bool) -> FusedSharedExperts:
    """A slot contract with top-2 routing, 64-wide slots, no routed scaling and no renormalisation."""
    return FusedSharedExperts.of(routed_experts, slots, replicas, 2, 64, gated, renormalize=False)


def test_slot_router_appends_every_slot_with_its_weight() -> None:
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

    from moeprep.runtime.fused_shared import SharedSlotRouter, slot_id_table

    contract = top2_slot_contract(8, slots=2, replicas=3, gated=True)
    assert contract.slot_ids == ((8, 9, 10), (11, 12, 13))
    inner = create_fused_moe_router(top_k=2, global_num_experts=8, renormalize=False)
    router = SharedSlotRouter(inner, contract, slot_id_table(contract, 4))
    hidden, logits = torch.randn(7, 16), torch.randn(7, 9)
    weights, ids = router.select_experts(hidden, logits)
    routed_weights, routed_ids = inner.select_experts(hidden, logits[:, :8].contiguous())
    assert torch.equal(ids[:, :2], routed_ids) and torch.equal(weights[:, :2], routed_weights)
    token = torch.arange(7).unsqueeze(1)
    assert torch.equal(ids[:, 2:].long(), 8 + 3 * torch.arange(2).unsqueeze(0) + token % 3)  # 7 > 4 table rows too
    torch.testing.assert_close(weights[:, 2:], torch.sigmoid(logits[:, 8:9]).expand(7, 2))

    from moeprep.rank_shards import SpreadSlotPlacement  # --ep 2: the layer's ids interleave routed and replicas

    spread = SpreadSlotPlacement.checked(8, 1, 2, 2).spread(top2_slot_contract(8, slots=1, replicas=2, gated=False))
    router = SharedSlotRouter(
        inner, spread, slot_id_table(spread, 4), torch.tensor(spread.routed_ids, dtype=torch.int32)
    )
    weights, ids = router.select_experts(hidden, logits[:, :8].contiguous())
    expected = torch.tensor(spread.routed_ids)[routed_ids.long()]
    assert torch.equal(ids[:, :2].long(), expected) and torch.equal(weights[:, :2], routed_weights)
    assert ids[:, 2].tolist() == [[4, 9][t % 2] for t in range(7)] and torch.all(weights[:, 2] == 1)


def test_slot_routers_skip_padding_rows_and_monolithic_kernels() -> None:
    """vLLM 0.34 routers mark CUDA-graph padding rows with expert id -1: their slots are skipped too (-1), and
    -1 is never mapped through the routed-id table (it would index its last entry)."""
    pytest.importorskip("vllm")
    from moeprep.runtime.fused_shared import SlotRouter, mapped_ids, padding_rows_skipped, slot_id_table

    contract = top2_slot_contract(4, slots=1, replicas=2, gated=False)
    routed = torch.tensor([[0, 3], [-1, -1], [2, 1], [-1, -1]], dtype=torch.int32)
    slots = padding_rows_skipped(routed, slot_id_table(contract, 4))
    assert slots.tolist() == [[4], [-1], [4], [-1]]
    table = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    assert mapped_ids(routed, table).tolist() == [[0, 6], [-1, -1], [4, 2], [-1, -1]]
    assert SlotRouter.supports_monolithic_kernels.fget(None) is False  # type: ignore[attr-defined]


def test_slots_are_masked_only_behind_routers_that_mark_padding_rows() -> None:
    """vLLM's grouped top-k router leaves padding rows routed unless built with ``skip_padding`` (moeprep never
    asks for it), so the slot router skips the -1 check behind it; behind any other router it keeps it."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

    from moeprep.runtime.fused_shared import marks_padding

    def grouped(**skip: bool) -> GroupedTopKRouter:
        return GroupedTopKRouter(top_k=2, global_num_experts=8, num_expert_group=2, topk_group=1, **skip)

    assert not marks_padding(grouped())
    if "skip_padding" in inspect.signature(GroupedTopKRouter).parameters:  # vLLM 0.32+
        assert marks_padding(grouped(skip_padding=True))
    assert marks_padding(create_fused_moe_router(top_k=2, global_num_experts=8, renormalize=False))


@pytest.mark.parametrize(
    ("module", "block", "routing"),
    [("deepseek_v2", "DeepseekV2MoE", "deepseek_routing"), ("glm4_moe", "Glm4MoE", "glm4_moe_routing")],
)
def test_fused_blocks_apply_their_gate_where_the_installed_vllms_original_block_does(
    module: str, block: str, routing: str
) -> None:
    """The original block either hands its gate to vLLM's MoE layer (whose runner applies it after starting the
    shared expert on the auxiliary stream) or applies it itself: the fused block does the same, so the steps
    left to the dense shared expert overlap as the original's do."""
    pytest.importorskip("vllm")
    import importlib

    from moeprep.runtime import fused_shared

    original = inspect.getsource(getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), block))
    config = type("Config", (), {"n_group": 1, "topk_group": 1, "topk_method": "noaux_tc"})()
    spec = getattr(fused_shared, routing)(config)
    assert spec.gate_in_moe_layer == ("gate=self.gate" in original)


def test_lora_on_fused_slots_is_refused(tiny, tmp_path: Path) -> None:
    combined = run_cli("convert", tiny("glm4-moe"), tmp_path / "both", "--fuse-shared-experts", "--lora", tmp_path)
    assert combined.returncode == 2 and "cannot be combined with --fuse-shared-experts" in combined.stderr
    assert not (tmp_path / "both").exists()
    assert run_cli("convert", tiny("glm4-moe"), tmp_path / "fused", "--fuse-shared-experts").returncode == 0
    split = run_cli("lora", "split", tmp_path, "--base", tmp_path / "fused", "--out", tmp_path / "split")
    assert split.returncode == 2 and "has fused shared-expert slots" in split.stderr
    assert not (tmp_path / "split").exists()


def mixed_fixture(root: Path, kept: str, seed: int) -> Path:
    """A block-fp8 DeepSeek-V3 whose ``kept`` modules (shared or routed experts) stayed bf16."""
    quant = {**DEEPSEEK_FP8_CONFIG, "modules_to_not_convert": [kept]}
    overrides = {"quantization_config": quant, "n_shared_experts": 2}
    return build_fixture("deepseek-v3", root, seed=seed, config_overrides=overrides, quantization="fp8-block")


def reference_block_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's 128x128 weight quantization written out block by block: scale = amax / 448 (1 for an
    all-zero block), e4m3 = round(w / scale)."""
    rows, cols = weight.shape
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty((rows + 127) // 128, (cols + 127) // 128)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = block.abs().max().item()
            scales[i, j] = amax / 448 if amax > 0 else 1.0
            quantized[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / scales[i, j]).to(torch.float8_e4m3fn)
    return quantized, scales


def test_bf16_shared_expert_is_requantized_to_the_routed_block_fp8(tmp_path: Path) -> None:
    source = mixed_fixture(tmp_path / "src", "shared_experts", fresh_seed(3))
    refused = run_cli("convert", source, tmp_path / "refused", "--fuse-shared-experts")
    assert refused.returncode == 2 and "add --requantize-shared-experts" in refused.stderr
    assert not (tmp_path / "refused").exists()
    result = run_cli("convert", source, tmp_path / "fused", "--fuse-shared-experts", "--requantize-shared-experts")
    assert result.returncode == 0, result.stderr
    tensors = {k: v for shard in (tmp_path / "fused").glob("model-*.safetensors") for k, v in load_file(shard).items()}
    contract = json.loads((tmp_path / "fused" / "moeprep.json").read_text())["routing"]["fused_shared_experts"]
    assert contract["slots_requantized"] == "BF16 -> F8_E4M3 with [128, 128] block scales"
    assert "slots requantized BF16 -> F8_E4M3" in " ".join(run_cli("inspect", tmp_path / "fused").stdout.split())
    original = open_local(source)
    mlp = "model.layers.1.mlp"
    x = torch.randn(5, 128, dtype=torch.float64)
    for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", -1)):
        shared = original.read(f"{mlp}.shared_experts.{proj}.weight")
        for s, ids in enumerate(contract["slot_ids"]):
            expected_q, expected_scale = reference_block_quantize(padded_chunk(shared, s, 128, dim))
            weight = tensors[f"{mlp}.experts.{ids[0]}.{proj}.weight"]
            assert torch.equal(weight.view(torch.uint8), expected_q.view(torch.uint8)), (proj, s)
            assert torch.equal(tensors[f"{mlp}.experts.{ids[0]}.{proj}.weight_scale_inv"], expected_scale)
    expected = swiglu(x, {n: original.read(n) for n in original.tensor_names}, f"{mlp}.shared_experts")
    fused = sum(swiglu(x, tensors, f"{mlp}.experts.{ids[0]}") for ids in contract["slot_ids"])
    assert (fused - expected).norm() / expected.norm() < 0.1  # e4m3 keeps 3 mantissa bits


def test_block_fp8_shared_expert_is_dequantized_to_the_routed_bf16(tmp_path: Path) -> None:
    source = mixed_fixture(tmp_path / "src", "experts", fresh_seed(3))
    result = run_cli("convert", source, tmp_path / "fused", "--fuse-shared-experts", "--requantize-shared-experts")
    assert result.returncode == 0, result.stderr
    tensors = {k: v for shard in (tmp_path / "fused").glob("model-*.safetensors") for k, v in load_file(shard).items()}
    contract = json.loads((tmp_path / "fused" / "moeprep.json").read_text())["routing"]["fused_shared_experts"]
    assert contract["slots_requantized"] == "F8_E4M3 -> BF16"
    original = open_local(source)
    mlp = "model.layers.1.mlp"
    for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", -1)):
        prefix = f"{mlp}.shared_experts.{proj}"
        weights = {f"{prefix}.weight": original.read(f"{prefix}.weight")}
        weights[f"{prefix}.weight_scale_inv"] = original.read(f"{prefix}.weight_scale_inv")
        dequantized = dequantized_weight(weights, prefix)
        for s, ids in enumerate(contract["slot_ids"]):
            slot = tensors[f"{mlp}.experts.{ids[0]}.{proj}.weight"]
            assert slot.dtype == torch.bfloat16 and f"{mlp}.experts.{ids[0]}.{proj}.weight_scale_inv" not in tensors
            assert torch.equal(slot, padded_chunk(dequantized, s, 128, dim).bfloat16())


def test_requantize_without_fusing_is_refused(tiny, tmp_path: Path) -> None:
    result = run_cli("convert", tiny("glm4-moe"), tmp_path / "out", "--requantize-shared-experts")
    assert result.returncode == 2 and "applies to --fuse-shared-experts" in result.stderr
