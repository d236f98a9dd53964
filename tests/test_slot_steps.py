"""MOEPREP_SHARED_SLOT_TOKENS: which steps route to the shared-expert slots, the dense shared expert for the
others, and where that path is refused. Served end to end: tests/e2e/test_fused_shared_cpu.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.runtime.slot_steps import (
    SLOT_TOKENS_ENV,
    SlotSteps,
    check_dense_steps,
    check_slots_to_choose,
    dense_shared_expert,
)
from moeprep.schema.routing import FusedSharedExperts
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
    assert SlotSteps.from_env().every_step
    monkeypatch.setenv(SLOT_TOKENS_ENV, "1-8")
    assert SlotSteps.from_env() == SlotSteps(((1, 8),))


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
