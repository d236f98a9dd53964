"""Runtime checks that run without a GPU: load accounting, manifest-vs-vLLM refusals, record lookup."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.families.fp8_block import DEEPSEEK_FP8_CONFIG
from moeprep.fixtures import build_fixture
from moeprep.runtime.tracking import PreparedTensorTracker
from moeprep.schema.manifest import SCHEMA_VERSION, FileRecord, Manifest, Source, Target, TensorRecord
from moeprep.schema.routing import FusedSharedExperts, routing_json
from tests.conftest import run_cli

pytest.importorskip("vllm")
from moeprep.runtime.quant_config import MoeprepConfig, check_manifest_against_runtime, running_vllm_version  # noqa: E402


def record(name: str) -> TensorRecord:
    return TensorRecord(
        file="model-00001-of-00001.safetensors",
        dtype="U8",
        stored_shape=[1],
        shape=[1],
        strides=[1],
        begin=0,
        end=1,
        sha256_tree="0" * 64,
        recipe="r",
        sources=[name],
    )


def manifest(backend: str = "triton", versions: list[str] | None = None, tp: int = 1) -> Manifest:
    names = [
        "model.layers.0.mlp.experts.routed_experts.moeprep_w13_value",
        "model.layers.0.mlp.experts.routed_experts.moeprep_w2_bias",
        "model.layers.1.mlp.experts.routed_experts.moeprep_w13_value",
        "model.layers.0.mlp.router.weight",
    ]
    return Manifest(
        moeprep_version="0",
        model_type="gpt_oss",
        architectures=["GptOssForCausalLM"],
        source=Source("local", "/src", None, {"config.json": FileRecord(1, "0" * 64)}),
        target=Target(backend, backend, 1, versions or [running_vllm_version()], tp_size=tp),
        files={},
        tensors={n: record(n) for n in names},
    )


def test_tracker_reports_prepared_tensors_no_layer_loaded() -> None:
    tracker = PreparedTensorTracker({"a.moeprep_x", "b.moeprep_x"})
    tracker.layer_built("a")
    tracker.layer_built("b")
    tracker.tensor_loaded("a.moeprep_x")
    tracker.layer_ready("a")  # b still open: no verdict yet
    with pytest.raises(PreparedCheckpointMismatch, match="b.moeprep_x"):
        tracker.layer_ready("b")


def test_tracker_accepts_complete_loads() -> None:
    tracker = PreparedTensorTracker({"a.moeprep_x"})
    tracker.layer_built("a")
    tracker.tensor_loaded("a.moeprep_x")
    tracker.layer_ready("a")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "none"}, "config.json says backend 'triton'"),
        ({"vllm_versions": ["0.1.0"]}, "verified for vLLM 0.1.0 but"),
        ({"vllm_ranges": [["0.1.0", "0.26.0"]]}, "verified for vLLM 0.1.0-0.26.0 but"),
        ({"tp_size": 4}, "tensor parallel size 4"),
        ({"ep_size": 4}, "expert parallel size 4, running with 2"),
    ],
)
def test_manifest_mismatches_are_refused(changes: dict, message: str) -> None:
    m = manifest()
    m.target = dataclasses.replace(m.target, **changes)
    with pytest.raises(PreparedCheckpointMismatch, match=message):
        check_manifest_against_runtime(m, "triton", tp_size=2, ep_size=2)


@pytest.mark.parametrize(
    ("changes", "served"),
    [
        ({"vllm_versions": ["0.1.0"], "vllm_ranges": [["0.1.0", "99.0.0"]]}, True),
        ({"vllm_versions": ["0.1.0"], "vllm_ranges": [["0.1.0", "0.2.0"], ["99.0.0", "99.1.0"]]}, False),
        ({"vllm_versions": ["0.1.0"], "recipe": "passthrough"}, True),
    ],
)
def test_running_vllm_is_served_within_the_recipe_ranges(changes: dict, served: bool) -> None:
    m = manifest()
    m.target = dataclasses.replace(m.target, **changes)
    if served:
        check_manifest_against_runtime(m, "triton", tp_size=1)
    else:
        with pytest.raises(PreparedCheckpointMismatch, match="verified for vLLM 0.1.0-0.2.0, 99.0.0-99.1.0 but"):
            check_manifest_against_runtime(m, "triton", tp_size=1)


def test_matching_parallel_sizes_are_accepted() -> None:
    m = manifest()
    m.target = dataclasses.replace(m.target, tp_size=2, ep_size=2)
    check_manifest_against_runtime(m, "triton", tp_size=2, ep_size=2)


def test_running_ep_size_spans_tp_and_dp_when_enabled() -> None:
    from types import SimpleNamespace

    from moeprep.runtime.quant_config import running_ep_size

    config = SimpleNamespace(enable_expert_parallel=True, tensor_parallel_size=2, data_parallel_size=2)
    assert running_ep_size(config) == 4
    config.enable_expert_parallel = False
    assert running_ep_size(config) == 1


def test_prepared_records_of_one_experts_module() -> None:
    config = MoeprepConfig("triton", None)
    config.manifest = manifest()
    for prefix in ("model.layers.0.mlp.experts", "model.layers.0.mlp.experts.routed_experts"):
        assert set(config.prepared_records(prefix)) == {
            "model.layers.0.mlp.experts.routed_experts.moeprep_w13_value",
            "model.layers.0.mlp.experts.routed_experts.moeprep_w2_bias",
        }


def test_layouts_not_served_yet_say_why() -> None:
    with pytest.raises(PreparedCheckpointMismatch, match="cannot serve backend 'flashinfer-trtllm' yet: .*Blackwell"):
        config = {"quant_method": "moeprep", "schema_version": SCHEMA_VERSION, "backend": "flashinfer-trtllm"}
        MoeprepConfig.from_config(config)


def test_cpu_layout_is_served_only_by_vllm_cpu_on_a_cpu_with_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its kernel (``CPUExpertsMxfp4``) runs only there; elsewhere the folder is refused in one line."""
    from moeprep.runtime import cpu_mxfp4
    from moeprep.runtime.mxfp4 import PreparedCpuMxfp4MoEMethod

    method = object.__new__(PreparedCpuMxfp4MoEMethod)  # check_machine reads nothing off the layer
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(cpu_mxfp4, "vllm_cpu_has_mxfp4_moe", lambda: False)
    with pytest.raises(PreparedCheckpointMismatch, match="need vLLM CPU on a CPU with AMX"):
        method.check_machine()
    monkeypatch.setattr(cpu_mxfp4, "vllm_cpu_has_mxfp4_moe", lambda: True)
    method.check_machine()


def test_unknown_backend_and_schema_are_refused() -> None:
    with pytest.raises(PreparedCheckpointMismatch, match="upgrade moeprep"):
        MoeprepConfig.from_config({"quant_method": "moeprep", "schema_version": SCHEMA_VERSION, "backend": "warp9"})
    with pytest.raises(PreparedCheckpointMismatch, match="schema 7"):
        MoeprepConfig.from_config({"quant_method": "moeprep", "schema_version": 7, "backend": "none"})


def test_fused_slots_are_served_only_by_their_architecture() -> None:
    from moeprep.runtime.fused_shared import check_fused_parallelism
    from moeprep.runtime.quant_config import check_architecture

    plain = manifest("none")
    single = FusedSharedExperts.of(8, 1, 2, 2, 64, False, architecture="MoeprepFusedGlm4MoeForCausalLM")
    fused = dataclasses.replace(plain, routing=routing_json(single))
    check_architecture(plain, ["GptOssForCausalLM"])
    check_architecture(fused, ["MoeprepFusedGlm4MoeForCausalLM"])
    with pytest.raises(PreparedCheckpointMismatch, match="was written for \\['MoeprepFusedGlm4MoeForCausalLM'\\]"):
        check_architecture(fused, ["Glm4MoeForCausalLM"])  # the plain model would look for the shared MLP
    with pytest.raises(PreparedCheckpointMismatch, match="was written for \\['GptOssForCausalLM'\\]"):
        check_architecture(plain, ["MoeprepFusedGlm4MoeForCausalLM"])
    parallel = type("Parallel", (), {"tensor_parallel_size": 2, "enable_expert_parallel": False, "enable_eplb": False})
    spread = dataclasses.replace(single, slot_ids=((4, 9),), routed_ids=(0, 1, 2, 3, 5, 6, 7, 8))  # --ep 2
    check_fused_parallelism(parallel, single)  # tensor parallelism: served (tests/e2e/test_tensor_parallel_cpu.py)
    parallel.enable_expert_parallel = True
    with pytest.raises(PreparedCheckpointMismatch, match="not placed for expert parallelism"):
        check_fused_parallelism(parallel, single)  # vLLM would put both replicas on the last rank
    check_fused_parallelism(parallel, spread)  # served (tests/e2e/test_tensor_parallel_cpu.py)
    parallel.enable_expert_parallel, parallel.enable_eplb = False, True
    with pytest.raises(PreparedCheckpointMismatch, match="--enable-eplb"):
        check_fused_parallelism(parallel, single)


def test_local_routing_sends_other_ranks_experts_to_local_zero_at_weight_zero() -> None:
    """What vLLM CPU's unquantized MoE kernel gets under expert parallelism (it ignores the expert map)."""
    import torch

    from moeprep.rank_shards import linear_placement
    from moeprep.runtime.rank_experts import local_routing

    experts, ranks = 10, 3
    ids = torch.randint(0, experts, (64, 4), dtype=torch.int32)
    weights = torch.rand(64, 4)
    total = torch.zeros(64)
    for rank in range(ranks):
        mine = linear_placement(experts, ranks, rank)
        expert_map = torch.full((experts,), -1, dtype=torch.int32)
        expert_map[mine.start : mine.stop] = torch.arange(len(mine), dtype=torch.int32)
        local_weights, local_ids = local_routing(expert_map, weights, ids)
        here = (ids >= mine.start) & (ids < mine.stop)
        assert local_ids.dtype == ids.dtype and local_ids.is_contiguous()
        assert torch.equal(local_ids[here], ids[here] - mine.start)
        assert torch.all(local_ids[~here] == 0) and torch.all(local_weights[~here] == 0)
        assert torch.equal(local_weights[here], weights[here])
        total += local_weights.sum(-1)
    assert torch.allclose(total, weights.sum(-1))  # every routed weight counted on exactly one rank


def compile_settings(folder: Path) -> tuple[list[str], dict]:
    """vLLM's custom ops and fusion passes for serving ``folder`` (the engine config, no weights loaded)."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(folder), load_format="dummy", max_model_len=256).create_engine_config()
    passes = config.compilation_config.pass_config
    return list(config.compilation_config.custom_ops), {"norm": passes.fuse_norm_quant, "act": passes.fuse_act_quant}


def test_prepared_block_fp8_folder_gets_the_originals_fp8_kernels_and_fusions(tmp_path: Path) -> None:
    """vLLM turns on its fp8 quant op and the norm/activation + quant fusions from the quantization config's
    ``weight_block_size``: a prepared folder must get them as its source does."""
    source = build_fixture("deepseek-v3", tmp_path / "src", quantization="fp8-block")
    prepared = tmp_path / "fused"
    result = run_cli("convert", source, prepared, "--fuse-shared-experts")
    assert result.returncode == 0, result.stderr
    original_ops, original_passes = compile_settings(source)
    assert "+quant_fp8" in original_ops and original_passes == {"norm": True, "act": True}
    assert compile_settings(prepared) == (original_ops, original_passes)
    config = MoeprepConfig("none", DEEPSEEK_FP8_CONFIG)
    assert config.weight_block_size == [128, 128] and not hasattr(MoeprepConfig("none", None), "weight_block_size")


def test_vllm_hooks_of_the_prepared_mxfp4_methods_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """The private vLLM names ``runtime/vllm_compat.py`` relies on are there; a vLLM without one is refused
    naming it, and the conversion swap is undone after its block."""
    import vllm.model_executor.layers.quantization.mxfp4 as method_module

    from moeprep.runtime import vllm_compat

    assert vllm_compat.missing_hooks() == []
    original = method_module.convert_gpt_oss_weight_to_mxfp4_moe_kernel_format
    with vllm_compat.conversion_replaced(print):
        assert method_module.convert_gpt_oss_weight_to_mxfp4_moe_kernel_format is print
    assert method_module.convert_gpt_oss_weight_to_mxfp4_moe_kernel_format is original
    monkeypatch.delattr(method_module, "convert_gpt_oss_weight_to_mxfp4_moe_kernel_format")
    with pytest.raises(PreparedCheckpointMismatch, match="lacks .*convert_gpt_oss_weight_to_mxfp4_moe_kernel_format"):
        vllm_compat.check_hooks()


def test_weight_cache_mode_is_read_from_vllm() -> None:
    """The prepared methods learn from vLLM whether its weight cache handed over post-processed tensors; the
    Marlin method says it supports that mode, as vLLM's loader asks every quant method."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.utils import weights_already_processed

    from moeprep.runtime import vllm_compat

    assert vllm_compat.weights_pre_processed() is False
    with weights_already_processed():
        assert vllm_compat.weights_pre_processed() is True
    assert QuantizeMethodBase.supports_pre_processed_weights is False
    from moeprep.runtime.mxfp4 import PREPARED_METHODS

    assert PREPARED_METHODS["marlin"].supports_pre_processed_weights is True
    assert PREPARED_METHODS["none"].supports_pre_processed_weights is False  # vLLM's own transform runs at load


def test_lora_on_triton_layouts_is_refused_where_vllm_hands_the_kernel_raw_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM 0.34 keeps Triton tensors beside raw-storage parameters, and its MoE LoRA wrapper passes the parameter;
    a wrapper that reads ``triton_weight`` (as vLLM's own mxfp4 method does) would be fine."""
    import types

    from moeprep.runtime import vllm_compat

    assert vllm_compat.lora_hands_triton_kernels_raw_weights() is False  # this vLLM keeps no Triton params
    monkeypatch.setattr(vllm_compat, "triton_params_kept", lambda: True)
    assert vllm_compat.lora_hands_triton_kernels_raw_weights() is True  # its LoRA wrapper passes layer.w13_weight

    class FixedWrapper:
        def apply(self, layer: object) -> object:
            return triton_weight(layer, "w13_weight")  # noqa: F821

    fixed = types.SimpleNamespace(FusedMoEModularMethod=FixedWrapper)
    monkeypatch.setattr(vllm_compat.importlib, "import_module", lambda name: fixed)
    assert vllm_compat.lora_hands_triton_kernels_raw_weights() is False


def test_weight_cache_counts_prepared_tensors_as_loaded() -> None:
    from moeprep.runtime.prepared_params import PreparedExpertParams
    from moeprep.runtime.tracking import PreparedTensorTracker
    from moeprep.schema.names import prepared_param_names

    names = prepared_param_names("weight", "scale", "bias")
    records = {f"model.layers.0.mlp.experts.{n}": None for n in names}
    tracker = PreparedTensorTracker(set(records))
    params = PreparedExpertParams(names, "model.layers.0.mlp.experts", records, tracker)  # type: ignore[arg-type]
    tracker.layer_built("model.layers.0.mlp.experts")
    with pytest.raises(PreparedCheckpointMismatch, match="was never loaded"):
        params.check_all_loaded()
    params.taken_from_weight_cache()
    params.check_all_loaded()
    tracker.layer_ready("model.layers.0.mlp.experts")


def triton_kernels_sm90(layer: dict, arch: str) -> dict:
    """A stand-in newer vLLM: the sm90 swizzle of the ``triton_kernels`` vLLM bundles (tests/reference.py)."""
    from moeprep.layout_check import vllm_parameters
    from tests.reference import reference_hopper_scale, reference_hopper_value

    params = vllm_parameters(layer)
    out = {}
    for w in ("w13", "w2"):
        out[f"moeprep_{w}_value"] = reference_hopper_value(params[w])
        out[f"moeprep_{w}_scale"] = reference_hopper_scale(params[f"{w}_scale"])
        out[f"moeprep_{w}_bias"] = params[f"{w}_bias"].float()
    return out


def one_byte_off(layer: dict, arch: str) -> dict:
    out = triton_kernels_sm90(layer, arch)
    scale = out["moeprep_w2_scale"].clone()
    scale.view(-1)[17] ^= 1
    return {**out, "moeprep_w2_scale": scale}


def outside_its_ranges() -> Manifest:
    m = manifest()
    m.target = dataclasses.replace(m.target, vllm_ranges=[["0.1.0", "0.2.0"]], knobs={"arch": "sm90"})
    return m


def test_folder_outside_its_ranges_is_served_where_the_running_vllm_makes_the_same_layout(monkeypatch) -> None:
    from moeprep import layout_check

    monkeypatch.setitem(layout_check.VLLM_TRANSFORMS, "triton", triton_kernels_sm90)
    check_manifest_against_runtime(outside_its_ranges(), "triton", tp_size=1)


def test_folder_outside_its_ranges_is_refused_naming_the_tensor_the_running_vllm_makes_differently(
    monkeypatch,
) -> None:
    from moeprep import layout_check

    monkeypatch.setitem(layout_check.VLLM_TRANSFORMS, "triton", one_byte_off)
    with pytest.raises(PreparedCheckpointMismatch, match="makes moeprep_w2_scale differently"):
        check_manifest_against_runtime(outside_its_ranges(), "triton", tp_size=1)


def test_strict_mode_refuses_outside_the_ranges_without_checking(monkeypatch) -> None:
    from moeprep import layout_check

    monkeypatch.setenv("MOEPREP_STRICT_VLLM", "1")
    monkeypatch.setitem(layout_check.VLLM_TRANSFORMS, "triton", lambda *args: pytest.fail("checked"))
    with pytest.raises(PreparedCheckpointMismatch, match="MOEPREP_STRICT_VLLM=1"):
        check_manifest_against_runtime(outside_its_ranges(), "triton", tp_size=1)


def test_where_the_running_vllm_cannot_prove_the_layout_it_is_refused_saying_why() -> None:
    with pytest.raises(PreparedCheckpointMismatch, match="cannot prove the layout here .*CUDA GPU"):
        check_manifest_against_runtime(outside_its_ranges(), "triton", tp_size=1)
