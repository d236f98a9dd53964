"""Per step, the shared-expert slots or vLLM's dense shared expert.

CUDA vLLM runs an unfused model's shared expert as a dense MLP on an auxiliary stream, beside the routed experts.
At most step sizes that costs less than the fused layer's wider top-(k+1) routing; at a few (where vLLM's default
kernel tiles are slow for the original's expert count) the slots win
(``benchmarks/results/fused_shared_speed_h200_vllm034.md``).
``MOEPREP_SHARED_SLOT_TOKENS`` names the step sizes, in tokens, at which the slots run: ``1-15,257-`` (ranges,
open at the top with ``N-``), ``none``, or ``all`` (the default, and the behaviour when it is unset). At any other
step the router returns the family's routing alone (the original's top-k, no slot columns: vLLM's MoE kernels
size their work from the expert ids they are handed) and the slot's own weights, loaded a second time into the
family's dense shared MLP, run as the MoE layer's shared experts: vLLM's own path for the original model. Both
sides decide from the step's token count inside vLLM's MoE custom op, so each CUDA graph size captures one path.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.schema.routing import FusedSharedExperts

SLOT_TOKENS_ENV = "MOEPREP_SHARED_SLOT_TOKENS"
_RANGE = re.compile(r"(\d+)(-(\d*))?")


@dataclass(frozen=True)
class SlotSteps:
    """The step sizes (tokens) at which the slots are routed to: ``(low, high)`` ranges, ``high`` None for open;
    ``ranges`` None: every step (no dense shared expert is built)."""

    ranges: tuple[tuple[int, int | None], ...] | None = None

    @property
    def every_step(self) -> bool:
        return self.ranges is None

    def routes_slots(self, tokens: int) -> bool:
        if self.ranges is None:
            return True
        return any(low <= tokens and (high is None or tokens <= high) for low, high in self.ranges)

    @classmethod
    def parse(cls, text: str) -> SlotSteps:
        """``all``, ``none`` or comma-separated ``N``, ``N-M`` and ``N-`` ranges of step sizes."""
        text = text.strip().lower()
        if text in ("", "all"):
            return cls()
        if text == "none":
            return cls(())
        ranges = []
        for part in text.split(","):
            match = _RANGE.fullmatch(part.strip())
            if not match or int(match[1]) < 1 or (match[3] and int(match[3]) < int(match[1])):
                raise PreparedCheckpointMismatch(
                    f"moeprep: {SLOT_TOKENS_ENV}={text!r}: expected all, none or step-size ranges such as 1-15,257-"
                )
            low = int(match[1])
            high = None if match[2] and not match[3] else int(match[3] or low)
            ranges.append((low, high))
        return cls(tuple(ranges))

    @classmethod
    def from_env(cls) -> SlotSteps:
        return cls.parse(os.environ.get(SLOT_TOKENS_ENV, ""))


EVERY_STEP = SlotSteps()


def check_slots_to_choose(contract: FusedSharedExperts | None) -> None:
    """Refuse a setting that names step sizes for a prepared folder without slots: it would change nothing."""
    if contract is None and not SlotSteps.from_env().every_step:
        raise PreparedCheckpointMismatch(
            f"moeprep: {SLOT_TOKENS_ENV} chooses between shared-expert slots and the dense shared expert, and this "
            f"folder has no slots (convert with --fuse-shared-experts for them); unset it"
        )


def check_dense_steps(
    steps: SlotSteps, contract: FusedSharedExperts, dense_mlp: type | None, moe_layer: Any, parallel_config: Any
) -> None:
    """Refuse ``steps`` with dense-shared-expert steps where that path is not built: a family without one dense
    MLP class for its shared expert (gated or row-routed shared experts), a shared expert split over several slots
    or requantized into them, expert or data parallelism (the router and the shared expert would see different
    token counts), or a vLLM whose MoE layer takes no shared experts (0.26, 0.32 and 0.34 all do)."""
    if steps.every_step:
        return
    reason = None
    if parallel_config.enable_expert_parallel or parallel_config.data_parallel_size > 1:
        reason = "expert or data parallelism"
    elif dense_mlp is None or contract.gated or contract.router_weight_on_input:
        reason = "this family's shared expert"
    elif contract.slots != 1:
        reason = f"a shared expert split over {contract.slots} slots"
    elif contract.slots_requantized:
        reason = f"slots requantized ({contract.slots_requantized})"
    elif "shared_experts" not in moe_layer_parameters(moe_layer):
        reason = "this vLLM, whose MoE layer takes no shared experts"
    if reason:
        raise PreparedCheckpointMismatch(
            f"moeprep: {SLOT_TOKENS_ENV} runs the shared expert outside its slots, which is not built for {reason}; "
            f"unset it to route every step to the slots"
        )


def moe_layer_parameters(moe_layer: Any) -> set[str]:
    return set(inspect.signature(moe_layer).parameters)


def dense_shared_expert(mlp_class: type, steps: SlotSteps, **mlp_args: Any) -> nn.Module:
    """The family's dense shared MLP (``mlp_class``, its parameters named as in the original model) that computes
    only at the steps ``steps`` does not route to the slots, and returns zeros at the others."""

    class DenseSharedExpert(mlp_class):  # type: ignore[misc, valid-type]
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            if steps.routes_slots(hidden_states.shape[0]):
                return torch.zeros_like(hidden_states)
            return super().forward(hidden_states)

    DenseSharedExpert.__name__ = DenseSharedExpert.__qualname__ = f"DenseShared{mlp_class.__name__}"
    return DenseSharedExpert(**mlp_args)
