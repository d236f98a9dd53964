"""Per step, the shared-expert slots or vLLM's dense shared expert.

CUDA vLLM runs an unfused model's shared expert as a dense MLP on an auxiliary stream, beside the routed experts.
At most step sizes that costs less than the fused layer's wider top-(k+1) routing; at a few (where vLLM's default
kernel tiles are slow for the original's expert count) the slots win
(``benchmarks/results/fused_shared_speed_h200_vllm034.md``).
``MOEPREP_SHARED_SLOT_TOKENS`` names the step sizes, in tokens, at which the slots run: ``1-15,257-`` (ranges,
open at the top with ``N-``), ``none`` or ``all``; unset, ``default_setting`` picks one (``MEASURED_SETTINGS`` for
the shapes measured, else decode steps dense on CUDA vLLM 0.34 and later, else ``all``). At any other
step the router returns the family's routing alone (the original's top-k, no slot columns: vLLM's MoE kernels
size their work from the expert ids they are handed) and the slot's own weights, loaded a second time into the
family's dense shared MLP, run as the MoE layer's shared experts: vLLM's own path for the original model. Both
sides decide from the step's token count inside vLLM's MoE custom op, so each CUDA graph size captures one path.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.schema.routing import FusedSharedExperts
from moeprep.schema.vllm_versions import version_key

SLOT_TOKENS_ENV = "MOEPREP_SHARED_SLOT_TOKENS"
_RANGE = re.compile(r"(\d+)(-(\d*))?")
logger = logging.getLogger("vllm.moeprep")  # under vLLM's logger, so its handlers print it


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
    def from_env(cls) -> SlotSteps | None:
        """The setting in ``MOEPREP_SHARED_SLOT_TOKENS``; None where it is unset (or empty)."""
        text = os.environ.get(SLOT_TOKENS_ENV, "")
        return cls.parse(text) if text.strip() else None


EVERY_STEP = SlotSteps()
DENSE_DECODE = "257-"  # decode steps on the dense shared expert, prefill-sized steps on the slots


@dataclass(frozen=True)
class ServingSetup:
    """What the default setting depends on: the fused layer's shape (the original's architecture and weight
    format) and where it is served (CUDA compute capability, None off CUDA; vLLM release; tensor parallel size)."""

    architecture: str
    hidden_size: int
    routed_experts: int
    expert_intermediate: int
    top_k: int
    weights: str  # the original's quant_method, "none" for float weights
    cuda_capability: tuple[int, int] | None
    vllm_version: str
    tensor_parallel: int

    def measured_key(self) -> tuple:
        major = None if self.cuda_capability is None else self.cuda_capability[0]
        shape = (self.architecture, self.hidden_size, self.routed_experts, self.expert_intermediate, self.top_k)
        return (*shape, self.weights, major, version_key(self.vllm_version)[:2], self.tensor_parallel)


# Settings measured against the original at batch sizes 1-64 on one GPU (benchmarks/results/
# fused_shared_speed_h200_vllm034.md): the slots run at the step sizes where they were faster than the original,
# every other step dense. Keyed by ServingSetup.measured_key: shape, weights, compute capability major, vLLM
# release, tensor parallel size; the kernel tiles vLLM picks change with each of them.
MEASURED_SETTINGS: dict[tuple, str] = {
    ("DeepseekV3ForCausalLM", 7168, 256, 2048, 8, "fp8", 9, (0, 34), 1): "5-15,257-",  # DeepSeek-V3 block fp8, H200
    ("Glm4MoeForCausalLM", 4096, 128, 1408, 8, "none", 9, (0, 34), 1): "2-4,257-",  # GLM-4.5-Air bf16, H200
}


def default_setting(setup: ServingSetup, dense_unavailable: str | None) -> tuple[str, str]:
    """The setting used where ``MOEPREP_SHARED_SLOT_TOKENS`` is unset, and why. The dense steps launch the
    original's kernels and take its time (measured on CUDA vLLM 0.34), where the slots' wider routing costs
    1-3% at most step sizes; elsewhere, and where the dense path is not built, every step runs on the slots."""
    if dense_unavailable:
        return "all", f"the dense shared expert is not built for {dense_unavailable}"
    if setup.cuda_capability is None:
        return "all", "off CUDA, where the dense steps' speed is not measured"
    if version_key(setup.vllm_version) < (0, 34, 0):
        return "all", f"vLLM {setup.vllm_version}: the dense steps' speed is measured on 0.34 and later only"
    if measured := MEASURED_SETTINGS.get(setup.measured_key()):
        return measured, "measured fastest for this shape, GPU generation and vLLM release"
    return DENSE_DECODE, "decode steps on vLLM's dense shared expert take the original's time"


def resolve_steps(
    contract: FusedSharedExperts, dense_mlp: type | None, moe_layer: Any, parallel_config: Any, setup: ServingSetup
) -> SlotSteps:
    """``MOEPREP_SHARED_SLOT_TOKENS`` where set (refused where the dense path is not built), else the default."""
    steps = SlotSteps.from_env()
    if steps is not None:
        check_dense_steps(steps, contract, dense_mlp, moe_layer, parallel_config)
        return steps
    setting, why = default_setting(setup, dense_unavailable(contract, dense_mlp, moe_layer, parallel_config))
    log_default(setting, why)
    return SlotSteps.parse(setting)


@functools.cache
def log_default(setting: str, why: str) -> None:
    """Once per process (the setting is resolved in every MoE block)."""
    logger.info("moeprep: shared-expert slots at step sizes %s (%s; set %s to choose)", setting, why, SLOT_TOKENS_ENV)


def check_slots_to_choose(contract: FusedSharedExperts | None) -> None:
    """Refuse a setting that names step sizes for a prepared folder without slots: it would change nothing."""
    steps = SlotSteps.from_env()
    if contract is None and steps is not None and not steps.every_step:
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
    if reason := dense_unavailable(contract, dense_mlp, moe_layer, parallel_config):
        raise PreparedCheckpointMismatch(
            f"moeprep: {SLOT_TOKENS_ENV} runs the shared expert outside its slots, which is not built for {reason}; "
            f"unset it to route every step to the slots"
        )


def dense_unavailable(
    contract: FusedSharedExperts, dense_mlp: type | None, moe_layer: Any, parallel_config: Any
) -> str | None:
    """Why the dense-shared-expert path is not built for this folder and vLLM (None: it is)."""
    if parallel_config.enable_expert_parallel or parallel_config.data_parallel_size > 1:
        return "expert or data parallelism"
    if dense_mlp is None or contract.gated or contract.router_weight_on_input:
        return "this family's shared expert"
    if contract.slots != 1:
        return f"a shared expert split over {contract.slots} slots"
    if contract.slots_requantized:
        return f"slots requantized ({contract.slots_requantized})"
    if "shared_experts" not in moe_layer_parameters(moe_layer):
        return "this vLLM, whose MoE layer takes no shared experts"
    return None


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
