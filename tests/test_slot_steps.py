"""MOEPREP_SHARED_SLOT_TOKENS: which steps route to the shared-expert slots, the dense shared expert for the
others, and where that path is refused. Served end to end: tests/e2e/test_fused_shared_cpu.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.families import get_family
from moeprep.fixtures.build import fixture_config
from moeprep.runtime.slot_steps import (
    DENSE_DECODE,
    MEASURED_SETTINGS,
    SLOT_TOKENS_ENV,
    ServingSetup,
    SlotSteps,
    check_dense_steps,
    check_slots_to_choose,
    default_setting,
    dense_shared_expert,
    log_default,
    resolve_steps,
)
from moeprep.schema.routing import FusedSharedExperts
from moeprep.shared_experts import routing_contract
from tests.conftest import fresh_seed


def test_step_ranges_are_parsed_as_written() -> None:
    assert SlotSteps.parse("").every_step and SlotSteps.parse(" ALL ").every_step
    never = SlotSteps.parse("none")
    assert not never.every_step and not any(never.routes_slots(t) for t in (1, 16, 4096))
    steps = SlotSteps.parse("1-15, 257-,64")
    routed = [t for t in (1, 15, 16, 63, 64, 65, 256, 257, 8192) if steps.routes_slots(t)]
    assert routed == [1, 15, 64, 257, 8192]
    for bad in ("0", "5-3", "small", "1-2-3", "1,,2", "-4"):
        with pytest.raises(PreparedCheckpointMismatch, match=f"{SLOT_TOKENS_ENV}=.*expected all, none or"):
            SlotSteps.parse(bad)


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SLOT_TOKENS_ENV, raising=False)
    assert SlotSteps.from_env() is None
    monkeypatch.setenv(SLOT_TOKENS_ENV, " ")
    assert SlotSteps.from_env() is None
    monkeypatch.setenv(SLOT_TOKENS_ENV, "all")
    assert SlotSteps.from_env() == SlotSteps()
    monkeypatch.setenv(SLOT_TOKENS_ENV, "1-8")
    assert SlotSteps.from_env() == SlotSteps(((1, 8),))


def real_shape(family: str, preset: str, quantization: str) -> tuple[dict, FusedSharedExperts]:
    """A model's config (``fixture_config`` presets are the real models' dimensions) and its one-slot contract."""
    config = fixture_config(family, preset, 4, quantization)
    spec = get_family(family)
    return config, routing_contract(spec, spec.moe_spec(config), config, 1)


def measured_setup(family: str, preset: str, quantization: str, **serving: object) -> ServingSetup:
    """The ServingSetup of the benchmark's shape, served on Hopper with vLLM 0.34 on one GPU unless ``serving``."""
    config, contract = real_shape(family, preset, quantization)
    where = {"cuda_capability": (9, 0), "vllm_version": "0.34.0", "tensor_parallel": 1} | serving
    return ServingSetup(
        architecture=contract.original_architectures[0],
        hidden_size=config["hidden_size"],
        routed_experts=contract.routed_experts,
        expert_intermediate=contract.expert_intermediate,
        top_k=contract.top_k,
        weights=config.get("quantization_config", {}).get("quant_method", "none"),
        **where,  # type: ignore[arg-type]
    )


def test_the_default_is_the_measured_setting_where_there_is_one_and_dense_decode_elsewhere_on_cuda() -> None:
    deepseek = measured_setup("deepseek-v3", "v3", "fp8-block")
    glm_air = measured_setup("glm4-moe", "air", "none")
    assert default_setting(deepseek, None)[0] == "5-15,257-"
    assert default_setting(glm_air, None)[0] == "2-4,257-"
    assert default_setting(dataclasses.replace(deepseek, vllm_version="0.34.1+cu130"), None)[0] == "5-15,257-"
    assert len(MEASURED_SETTINGS) == 2  # each entry above is reached from its model's real dimensions
    for elsewhere in (
        dataclasses.replace(deepseek, weights="none"),  # DeepSeek-V3 in bf16: another kernel
        dataclasses.replace(deepseek, routed_experts=384),  # Kimi-K2's shape
        dataclasses.replace(glm_air, tensor_parallel=2),
        dataclasses.replace(glm_air, cuda_capability=(10, 0)),
        dataclasses.replace(glm_air, vllm_version="0.35.0"),
    ):
        assert default_setting(elsewhere, None)[0] == DENSE_DECODE
    everywhere = {
        "off CUDA": (dataclasses.replace(deepseek, cuda_capability=None), None),
        "vLLM 0.26.0": (dataclasses.replace(deepseek, vllm_version="0.26.0"), None),
        "not built for expert": (deepseek, "expert or data parallelism"),
    }
    for why, args in everywhere.items():
        setting, reason = default_setting(*args)
        assert setting == "all" and why in reason


def test_the_serving_setup_is_read_from_the_model_and_the_running_vllm() -> None:
    pytest.importorskip("vllm")
    import vllm

    from moeprep.runtime.fused_shared import serving_setup

    expected = measured_setup("deepseek-v3", "v3", "fp8-block")
    config, contract = real_shape("deepseek-v3", "v3", "fp8-block")
    quant_config = SimpleNamespace(original_config=config["quantization_config"])
    setup = serving_setup(SimpleNamespace(hidden_size=config["hidden_size"]), contract, quant_config, 2)
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    where = {"cuda_capability": capability, "vllm_version": vllm.__version__.split("+")[0], "tensor_parallel": 2}
    assert setup == dataclasses.replace(expected, **where)  # type: ignore[arg-type]
    bf16 = serving_setup(SimpleNamespace(hidden_size=64), contract, SimpleNamespace(original_config=None), 1)
    assert bf16.weights == "none"


def test_the_environment_overrides_the_default_and_is_refused_where_the_dense_path_is_not_built(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def moe_layer(num_experts: int, shared_experts: nn.Module | None = None) -> None: ...

    one_slot = FusedSharedExperts.of(8, 1, 1, 2, 64, False)
    single = SimpleNamespace(enable_expert_parallel=False, data_parallel_size=1)
    expert_parallel = SimpleNamespace(enable_expert_parallel=True, data_parallel_size=1)
    setup = measured_setup("glm4-moe", "air", "none")
    monkeypatch.delenv(SLOT_TOKENS_ENV, raising=False)
    log_default.cache_clear()  # it logs once per process
    with caplog.at_level("INFO", logger="vllm.moeprep"):
        assert resolve_steps(one_slot, ToyMLP, moe_layer, single, setup) == SlotSteps.parse("2-4,257-")
    assert "shared-expert slots at step sizes 2-4,257- (measured" in caplog.text
    assert resolve_steps(one_slot, ToyMLP, moe_layer, expert_parallel, setup).every_step
    monkeypatch.setenv(SLOT_TOKENS_ENV, "none")
    assert resolve_steps(one_slot, ToyMLP, moe_layer, single, setup) == SlotSteps(())
    with pytest.raises(PreparedCheckpointMismatch, match="expert or data parallelism"):
        resolve_steps(one_slot, ToyMLP, moe_layer, expert_parallel, setup)
    monkeypatch.setenv(SLOT_TOKENS_ENV, "all")
    assert resolve_steps(one_slot, ToyMLP, moe_layer, expert_parallel, setup).every_step


class ToyMLP(nn.Module):
    """The constructor vLLM's DeepseekV2MLP and Glm4MoeMLP share, on a plain SwiGLU MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, quant_config, reduce_results, prefix):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(torch.nn.functional.silu(gate) * up)


def test_the_dense_shared_expert_computes_only_at_the_steps_left_to_it() -> None:
    torch.manual_seed(fresh_seed())
    steps = SlotSteps.parse("1-4")
    shared = dense_shared_expert(
        ToyMLP, steps, hidden_size=8, intermediate_size=16, hidden_act="silu", quant_config=None,
        reduce_results=False, prefix="model.layers.1.mlp.shared_experts",
    )  # fmt: skip
    assert isinstance(shared, ToyMLP) and type(shared).__name__ == "DenseSharedToyMLP"
    assert [name for name, _ in shared.named_parameters()] == ["gate_up_proj.weight", "down_proj.weight"]
    small, large = torch.randn(4, 8), torch.randn(5, 8)
    assert torch.equal(shared(small), torch.zeros(4, 8))
    assert torch.equal(shared(large), ToyMLP.forward(shared, large)) and shared(large).abs().sum() > 0


def test_steps_left_to_the_dense_shared_expert_get_the_family_routing_alone() -> None:
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

    from moeprep.runtime.fused_shared import SharedSlotRouter, slot_id_table

    torch.manual_seed(fresh_seed())
    contract = FusedSharedExperts.of(8, 1, 2, 2, 64, False, renormalize=False)
    inner = create_fused_moe_router(top_k=2, global_num_experts=8, renormalize=False)
    router = SharedSlotRouter(inner, contract, slot_id_table(contract, 16), None, SlotSteps.parse("1-4"))
    for tokens in (3, 7):
        hidden, logits = torch.randn(tokens, 16), torch.randn(tokens, 8)
        weights, ids = router.select_experts(hidden, logits)
        routed_weights, routed_ids = inner.select_experts(hidden, logits)
        assert torch.equal(ids[:, :2], routed_ids) and torch.equal(weights[:, :2], routed_weights)
        if tokens <= 4:  # the slots, replica token % 2, at weight 1
            assert ids.shape == (tokens, 3) and weights.shape == (tokens, 3)
            assert ids[:, 2].tolist() == [8 + t % 2 for t in range(tokens)] and torch.all(weights[:, 2] == 1)
        else:  # the original's top-k: no slot column for the kernel to compute
            assert ids.shape == (tokens, 2) and weights.shape == (tokens, 2)


def test_the_dense_path_is_refused_where_it_is_not_built() -> None:
    steps, one_slot = SlotSteps.parse("1-15"), FusedSharedExperts.of(8, 1, 1, 2, 64, False)

    def moe_layer(num_experts: int, shared_experts: nn.Module | None = None) -> None: ...

    def moe_layer_without_shared(num_experts: int) -> None: ...

    single = SimpleNamespace(enable_expert_parallel=False, data_parallel_size=1)
    data_parallel = SimpleNamespace(enable_expert_parallel=False, data_parallel_size=2)
    check_dense_steps(steps, one_slot, ToyMLP, moe_layer, single)
    check_dense_steps(SlotSteps(), FusedSharedExperts.of(8, 2, 1, 2, 64, True), None, moe_layer_without_shared, single)
    refusals = {
        "this family's shared expert": (one_slot, None, moe_layer, single),
        "this family's shared expert ": (FusedSharedExperts.of(8, 1, 1, 2, 64, True), ToyMLP, moe_layer, single),
        "split over 2 slots": (FusedSharedExperts.of(8, 2, 1, 2, 64, False), ToyMLP, moe_layer, single),
        "requantized": (dataclasses.replace(one_slot, slots_requantized="bf16->fp8"), ToyMLP, moe_layer, single),
        "expert or data parallelism": (one_slot, ToyMLP, moe_layer, data_parallel),
        "MoE layer takes no shared experts": (one_slot, ToyMLP, moe_layer_without_shared, single),
    }  # fmt: skip
    for reason, args in refusals.items():
        with pytest.raises(PreparedCheckpointMismatch, match=f"{reason.strip()}.*unset it") as refused:
            check_dense_steps(steps, *args)
        assert "\n" not in str(refused.value)


def test_a_setting_for_a_folder_without_slots_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    contract = FusedSharedExperts.of(8, 1, 1, 2, 64, False)
    monkeypatch.delenv(SLOT_TOKENS_ENV, raising=False)
    check_slots_to_choose(None)
    monkeypatch.setenv(SLOT_TOKENS_ENV, "1-15")
    check_slots_to_choose(contract)
    with pytest.raises(PreparedCheckpointMismatch, match="this folder has no slots .*--fuse-shared-experts.*unset it"):
        check_slots_to_choose(None)
