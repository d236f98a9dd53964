"""Serve folders converted with ``--fuse-shared-experts``: one grouped MoE kernel runs routed and shared experts.

The prepared config.json names one of the architectures below. Each is vLLM's own model class, built with
its MoE block replaced by ``FusedSharedExpertsMoE``: the router (vLLM's, over the routed experts only)
picks the top-k, then ``SharedSlotRouter`` appends the shared-expert slots with the weight the manifest's
routing contract gives; the MoE layer holds ``E + slots * replicas`` experts and runs ``top_k + slots``
per token. Llama 4, whose routing weight scales the routed expert's input, gets ``FusedSlotRowsMoE`` instead:
each token runs as ``1 + slots`` rows through one top-1 MoE layer (row 0 routed, row ``1 + s`` to slot ``s``
at weight 1) and the rows' outputs are summed. No shared-expert MLP is built, loaded or run, unless
``MOEPREP_SHARED_SLOT_TOKENS`` leaves some step sizes to vLLM's dense shared expert (``runtime.slot_steps``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers import fused_moe
from vllm.model_executor.layers.fused_moe import GateLinear, fused_moe_make_expert_params_mapping
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter
from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router
from vllm.platforms import current_platform

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.runtime.slot_steps import (
    EVERY_STEP,
    ServingSetup,
    SlotSteps,
    check_dense_steps,
    dense_shared_expert,
    moe_layer_parameters,
    resolve_steps,
)
from moeprep.runtime.vllm_compat import replaced
from moeprep.schema.names import parse_expert_tensor
from moeprep.schema.routing import FusedSharedExperts

# vLLM 0.26 names the MoE layer factory FusedMoE, 0.32 FusedMoEFactory.
MOE_LAYER = getattr(fused_moe, "FusedMoEFactory", None) or fused_moe.FusedMoE


@dataclass(frozen=True)
class GateAndRouting:
    """How a family's vLLM MoE block builds its router gate and routes (mirrored, so routing is unchanged)."""

    use_grouped_topk: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    scoring_func: str = "softmax"
    correction_bias: bool = False
    gate_out_dtype: torch.dtype | None = None
    gate_params_dtype: torch.dtype | None = None
    # The block hands its gate to vLLM's MoE layer, whose runner applies it after starting the shared expert on
    # the auxiliary stream, so the two overlap (vLLM's DeepseekV2MoE); else the block applies it before the layer.
    gate_in_moe_layer: bool = False


def slot_id_table(contract: FusedSharedExperts, rows: int) -> torch.Tensor:
    """``[rows, slots]`` expert ids: row ``t`` takes replica ``t % replicas`` of every slot."""
    ids = torch.tensor(contract.slot_ids, dtype=torch.int32)  # [slots, replicas]
    replica = torch.arange(rows) % contract.replicas
    return ids[:, replica].T.contiguous()


class SlotRouter(BaseRouter):
    """A custom router: the family's own router (``inner``) over the routed experts, plus the slots."""

    def __init__(self, inner: BaseRouter, contract: FusedSharedExperts, top_k: int) -> None:
        super().__init__(top_k=top_k, global_num_experts=contract.num_experts)
        self.inner, self.contract = inner, contract

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    @property
    def supports_monolithic_kernels(self) -> bool:
        """A monolithic kernel routes from the logits itself and would skip the slots: vLLM 0.33+ reads this and
        picks a modular kernel (older releases are refused one by ``check_not_monolithic``)."""
        return False


def marks_padding(router: BaseRouter) -> bool:
    """Whether ``router`` may route CUDA-graph padding rows to expert -1 (vLLM 0.32+: its fused top-k routers do,
    its grouped top-k router only when built with ``skip_padding``, as moeprep never builds it; vLLM 0.26: none)."""
    return not (isinstance(router, GroupedTopKRouter) and not getattr(router, "skip_padding", False))


def padding_rows_skipped(routed_ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """``slot_ids`` with the rows the router marked as padding (expert ids -1, vLLM 0.34+) set to -1 too, so the
    kernel skips their slots as it skips their routed experts."""
    return slot_ids.masked_fill(routed_ids[:, :1] < 0, -1)


def mapped_ids(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Router expert ids mapped to the layer's through ``table``; padding ids (-1) stay -1."""
    mapped = table[ids.clamp(min=0).long()].to(ids.dtype)
    return torch.where(ids < 0, ids, mapped)


class SharedSlotRouter(SlotRouter):
    """The family's router over the routed experts, plus every slot per token (replica ``token % replicas``)
    at weight 1, or ``sigmoid`` of the gate's extra logit row for gated shared experts. Slot ids and unit
    weights are sliced from tables built once, so a decode step adds only the two concatenations. At the steps
    ``steps`` leaves to the dense shared expert it returns the family's routing alone, without slot columns: the
    original's top-k (vLLM's MoE kernels size their work from the ids they are handed, not from the layer's top_k)."""

    def __init__(
        self,
        inner: BaseRouter,
        contract: FusedSharedExperts,
        slot_ids: torch.Tensor,
        routed_ids: torch.Tensor | None = None,
        steps: SlotSteps = EVERY_STEP,
    ) -> None:
        """``routed_ids``: the router's expert -> the layer's id, when they differ (``contract.routed_ids``)."""
        super().__init__(inner, contract, contract.top_k + contract.slots)
        self.slot_ids, self.routed_ids, self.steps = slot_ids, routed_ids, steps
        self.marks_padding = marks_padding(inner)  # else no -1 rows: two kernels a step saved
        self.unit_weights = torch.ones(slot_ids.shape, dtype=torch.float32, device=slot_ids.device)

    def _compute_routing(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        indices_type: torch.dtype | None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.contract
        routed_logits = router_logits[:, : c.routed_experts].contiguous() if c.gated else router_logits
        weights, ids = self.inner._compute_routing(hidden_states, routed_logits, indices_type, input_ids=input_ids)
        if self.routed_ids is not None:
            ids = mapped_ids(ids, self.routed_ids)
        tokens = ids.shape[0]
        if not self.steps.routes_slots(tokens):  # the original's routing; vLLM's kernels take top-k from the ids
            return weights, ids
        if tokens <= self.slot_ids.shape[0]:
            slot_ids = self.slot_ids[:tokens]
        else:  # more tokens than the scheduler's batch budget: build the rows for this call
            slot_ids = slot_id_table(c, tokens).to(ids.device)
        if c.gated:
            gate = torch.sigmoid(router_logits[:, c.routed_experts].to(weights.dtype))
            slot_weights = gate.unsqueeze(1).expand(tokens, c.slots)
        elif tokens <= self.unit_weights.shape[0] and weights.dtype == torch.float32:
            slot_weights = self.unit_weights[:tokens]
        else:
            slot_weights = torch.ones(tokens, c.slots, dtype=weights.dtype, device=weights.device)
        slot_ids = slot_ids.to(ids.dtype)
        if self.marks_padding:
            slot_ids = padding_rows_skipped(ids, slot_ids)
        return torch.cat([weights, slot_weights], dim=1), torch.cat([ids, slot_ids], dim=1)


def serving_setup(config: Any, contract: FusedSharedExperts, quant_config: Any, tensor_parallel: int) -> ServingSetup:
    """The fused layer's shape and where vLLM serves it, for the default per-step setting."""
    from moeprep.runtime.quant_config import running_vllm_version

    capability = current_platform.get_device_capability() if current_platform.is_cuda() else None
    original = getattr(quant_config, "original_config", None) or {}
    return ServingSetup(
        architecture=contract.original_architectures[0] if contract.original_architectures else "",
        hidden_size=config.hidden_size,
        routed_experts=contract.routed_experts,
        expert_intermediate=contract.expert_intermediate,
        top_k=contract.top_k,
        weights=str(original.get("quant_method", "none")),
        cuda_capability=None if capability is None else (capability.major, capability.minor),
        vllm_version=running_vllm_version(),
        tensor_parallel=tensor_parallel,
    )


def current_contract() -> FusedSharedExperts:
    """The contract of the prepared folder vLLM is loading (read through the moeprep quantization config)."""
    from moeprep.runtime.quant_config import MoeprepConfig

    quant_config = get_current_vllm_config().quant_config
    if not isinstance(quant_config, MoeprepConfig):
        raise PreparedCheckpointMismatch(
            "moeprep: the MoeprepFused* architectures load folders written by moeprep convert --fuse-shared-experts"
        )
    return quant_config.fused_shared_contract()


class FusedSharedExpertsMoE(nn.Module):
    """Router gate + one MoE layer over routed experts and shared-expert slots (replaces a family's MoE block)."""

    routing: Callable[[Any], GateAndRouting]
    dense_mlp: type | None  # the family's MLP class for its shared expert (None: none that the slot fits)

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "", **_: Any) -> None:
        super().__init__()
        contract = current_contract()
        spec = self.routing(config)
        hidden = config.hidden_size
        self.contract = contract
        vllm_config = get_current_vllm_config()
        parallel = vllm_config.parallel_config
        setup = serving_setup(config, contract, quant_config, parallel.tensor_parallel_size)
        steps = resolve_steps(contract, self.dense_mlp, MOE_LAYER, parallel, setup)
        self.shared_experts: nn.Module | None = None
        if not steps.every_step:  # registered before the experts, so its parameters take the original's names
            self.shared_experts = dense_shared_expert(
                self.dense_mlp,
                steps,
                hidden_size=hidden,
                intermediate_size=contract.expert_intermediate,
                hidden_act=config.hidden_act,
                quant_config=quant_config,
                reduce_results=False,
                prefix=f"{prefix}.shared_experts",
            )
        layer_modules = {} if self.shared_experts is None else {"shared_experts": self.shared_experts}
        self.gate = GateLinear(
            hidden,
            contract.routed_experts + int(contract.gated),
            out_dtype=spec.gate_out_dtype,
            params_dtype=spec.gate_params_dtype,
            prefix=f"{prefix}.gate",
        )
        bias = None
        if spec.correction_bias:
            bias = nn.Parameter(torch.empty(contract.routed_experts, dtype=torch.float32))
            self.gate.e_score_correction_bias = bias
        rows = vllm_config.scheduler_config.max_num_batched_tokens
        self.register_buffer("slot_ids", slot_id_table(contract, rows), persistent=False)
        routed_ids = None if contract.routed_ids is None else torch.tensor(contract.routed_ids, dtype=torch.int32)
        self.register_buffer("routed_ids", routed_ids, persistent=False)
        inner = create_fused_moe_router(
            top_k=contract.top_k,
            global_num_experts=contract.routed_experts,
            renormalize=contract.renormalize,
            use_grouped_topk=spec.use_grouped_topk,
            num_expert_group=spec.num_expert_group,
            topk_group=spec.topk_group,
            scoring_func=spec.scoring_func,
            routed_scaling_factor=contract.routed_scaling_factor,
            e_score_correction_bias=bias,
        )
        self.gate_in_moe_layer = spec.gate_in_moe_layer and "gate" in moe_layer_parameters(MOE_LAYER)
        if self.gate_in_moe_layer:
            layer_modules["gate"] = self.gate
        self.experts = MOE_LAYER(
            num_experts=contract.num_experts,
            top_k=contract.top_k + contract.slots,
            hidden_size=hidden,
            intermediate_size=contract.expert_intermediate,
            renormalize=contract.renormalize,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            router=SharedSlotRouter(inner, contract, self.slot_ids, self.routed_ids, steps),
            router_logits_dtype=spec.gate_out_dtype,
            reduce_results=True,  # under tensor parallelism the layer all-reduces routed + shared output itself
            **layer_modules,
        )
        # What vLLM's MoE-model mixins read from a block (expert counts for EPLB bookkeeping).
        self.n_routed_experts = self.n_logical_experts = contract.num_experts
        self.n_physical_experts = self.n_local_physical_experts = contract.num_experts
        self.n_shared_experts = self.n_redundant_experts = 0

    def forward(self, hidden_states: torch.Tensor, already_sequence_parallel: bool = False) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.view(-1, shape[-1])
        router_logits = flat if self.gate_in_moe_layer else self.gate(flat)[0]  # the layer applies its gate itself
        return self.experts(hidden_states=flat, router_logits=router_logits).view(shape)


class SlotRowsRouter(SlotRouter):
    """For a MoE layer whose routing weight scales the expert's input (Llama 4, top-1): the hidden states come
    as ``1 + slots`` blocks of the same T token rows; block 0 is routed by the family's router, block ``1 + s``
    goes to slot ``s`` (replica ``token % replicas``) at weight 1, so its input stays unscaled."""

    def __init__(self, inner: BaseRouter, contract: FusedSharedExperts) -> None:
        super().__init__(inner, contract, contract.top_k)

    def _compute_routing(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        indices_type: torch.dtype | None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.contract
        tokens = hidden_states.shape[0] // (1 + c.slots)
        weights, ids = self.inner._compute_routing(
            hidden_states[:tokens], router_logits[:tokens], indices_type, input_ids=input_ids
        )
        slot_ids = slot_id_table(c, tokens).to(device=ids.device, dtype=ids.dtype)
        slot_ids = padding_rows_skipped(ids, slot_ids).T.reshape(-1, 1)
        slot_weights = torch.ones(slot_ids.shape, dtype=weights.dtype, device=weights.device)
        return torch.cat([weights, slot_weights]), torch.cat([ids, slot_ids])


class FusedSlotRowsMoE(nn.Module):
    """Llama 4's MoE block with its shared expert in slots: vLLM's router and top-1 routing (sigmoid weight on
    the routed expert's input), and one MoE layer of ``E + slots * replicas`` experts run on ``1 + slots``
    copies of the token rows (``SlotRowsRouter``), whose outputs are summed. No shared-expert MLP is built."""

    routing_function: Callable  # the original block's top-1 + sigmoid routing

    def __init__(self, vllm_config: Any, prefix: str = "", **_: Any) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        contract = current_contract()
        if (steps := SlotSteps.from_env()) is not None:  # unset: every step on the slots (no dense path here)
            check_dense_steps(steps, contract, None, MOE_LAYER, vllm_config.parallel_config)
        self.contract = contract
        self.router = GateLinear(config.hidden_size, contract.routed_experts, prefix=f"{prefix}.router")
        inner = create_fused_moe_router(
            top_k=contract.top_k,
            global_num_experts=contract.routed_experts,
            renormalize=False,
            custom_routing_function=self.routing_function,
        )
        self.experts = MOE_LAYER(
            num_experts=contract.num_experts,
            top_k=contract.top_k,
            hidden_size=config.hidden_size,
            intermediate_size=contract.expert_intermediate,
            apply_router_weight_on_input=True,
            renormalize=False,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.experts",
            router=SlotRowsRouter(inner, contract),
            reduce_results=True,
        )
        self.n_routed_experts = self.n_logical_experts = contract.num_experts
        self.n_physical_experts = self.n_local_physical_experts = contract.num_experts
        self.n_shared_experts = self.n_redundant_experts = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        blocks = 1 + self.contract.slots
        router_logits, _ = self.router(hidden_states)
        rows = hidden_states.repeat(blocks, 1)
        out = self.experts(hidden_states=rows, router_logits=router_logits.repeat(blocks, 1))
        return out.view(blocks, *hidden_states.shape).sum(0)


def deepseek_routing(config: Any) -> GateAndRouting:
    from vllm.model_executor.models.deepseek_v2 import _get_moe_router_dtype

    return GateAndRouting(
        use_grouped_topk=True,
        num_expert_group=getattr(config, "n_group", 1),
        topk_group=getattr(config, "topk_group", 1),
        scoring_func=getattr(config, "scoring_func", "softmax"),
        correction_bias=getattr(config, "topk_method", None) == "noaux_tc",
        gate_out_dtype=_get_moe_router_dtype(config),
        gate_in_moe_layer=True,
    )


def glm4_moe_routing(config: Any) -> GateAndRouting:
    return GateAndRouting(
        use_grouped_topk=True,
        num_expert_group=config.n_group,
        topk_group=config.topk_group,
        scoring_func="sigmoid",
        correction_bias=True,
        gate_out_dtype=torch.float32,
        gate_params_dtype=torch.float32,
    )


def qwen2_moe_routing(config: Any) -> GateAndRouting:
    return GateAndRouting()


def load_slot_tensor(params: dict[str, nn.Parameter], mapping: list, name: str, tensor: torch.Tensor) -> str:
    """Copy one slot expert's tensor into the MoE layer through vLLM's expert weight loader."""
    for param_name, weight_name, expert_id, shard_id in mapping:
        if weight_name not in name:
            continue
        target = name.replace(weight_name, param_name)
        if target not in params:
            break
        param = params[target]
        if not param.weight_loader(param, tensor, target, shard_id=shard_id, expert_id=expert_id, return_success=True):
            break
        return target
    raise PreparedCheckpointMismatch(f"moeprep: shared-expert slot tensor {name} has no parameter to load into")


def fused_model_class(
    arch: str,
    module_name: str,
    parent_name: str,
    block_name: str,
    routing: Callable | None,
    dense_mlp_name: str | None = None,
) -> type:
    """``arch``: vLLM's ``parent_name`` model with its ``block_name`` MoE blocks fused (``routing`` mirrors the
    family's router; None: Llama 4's routing with the weight on the input, ``FusedSlotRowsMoE`` with the block's
    own ``custom_routing_function``). ``dense_mlp_name``: the family's MLP class its shared expert is, for the
    steps ``MOEPREP_SHARED_SLOT_TOKENS`` leaves to it."""
    module = importlib.import_module(module_name)
    parent = getattr(module, parent_name)
    if routing is None:
        original = staticmethod(getattr(module, block_name).custom_routing_function)
        block = type(block_name, (FusedSlotRowsMoE,), {"routing_function": original, "__module__": __name__})
    else:
        dense_mlp = getattr(module, dense_mlp_name) if dense_mlp_name else None
        members = {"routing": staticmethod(routing), "dense_mlp": dense_mlp, "__module__": __name__}
        block = type(block_name, (FusedSharedExpertsMoE,), members)

    def __init__(self: nn.Module, *, vllm_config: Any, prefix: str = "") -> None:
        contract = current_contract()
        check_fused_parallelism(vllm_config.parallel_config, contract)
        with replaced(module, block_name, block):
            parent.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.moeprep_contract = contract

    def load_weights(self: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        contract: FusedSharedExperts = self.moeprep_contract
        params = dict(self.named_parameters())
        mapping = [
            entry
            for entry in fused_moe_make_expert_params_mapping(
                self, "gate_proj", "down_proj", "up_proj", num_experts=contract.num_experts
            )
            if entry[2] >= contract.routed_experts
        ]
        slots_loaded: set[str] = set()
        blocks = [m for m in self.modules() if isinstance(m, FusedSharedExpertsMoE)]
        dense_shared = any(block.shared_experts is not None for block in blocks)  # MOEPREP_SHARED_SLOT_TOKENS set

        def routed_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                parsed = parse_expert_tensor(name)
                if parsed and parsed.expert >= contract.routed_experts:
                    slots_loaded.add(load_slot_tensor(params, mapping, name, tensor))
                    if dense_shared and parsed.expert == contract.slot_ids[0][0]:  # the slot as the original's MLP
                        yield f"{parsed.mlp}.shared_experts.{parsed.proj}.{parsed.kind}", tensor
                else:
                    yield name, tensor

        loaded = set(parent.load_weights(self, routed_weights()))
        check_not_monolithic(self)
        return loaded | slots_loaded

    return type(arch, (parent,), {"__init__": __init__, "load_weights": load_weights, "__module__": __name__})


def check_fused_parallelism(parallel_config: Any, contract: FusedSharedExperts) -> None:
    """Fused slots are verified on one device, under tensor parallelism (each rank holds its slice of every
    slot, as of every routed expert) and, for folders converted with ``--ep``, under expert parallelism (each
    rank holds its share of every slot's replicas); refuse the parallel modes they were not verified under."""
    if parallel_config.enable_expert_parallel and contract.routed_ids is None:
        raise PreparedCheckpointMismatch(
            "moeprep: this folder's fused shared-expert slots are not placed for expert parallelism (vLLM would put "
            "them all on the last rank); serve without --enable-expert-parallel (tensor parallelism works), or "
            "convert with --ep N --fuse-shared-experts=R (R a multiple of N) to spread the replicas over the ranks"
        )
    if parallel_config.enable_eplb:
        raise PreparedCheckpointMismatch("moeprep: fused shared experts do not support --enable-eplb")


def check_not_monolithic(model: nn.Module) -> None:
    """A monolithic MoE kernel routes from the logits itself and would skip the slots: refuse it."""
    for name, module in model.named_modules():
        if isinstance(module, FusedSharedExpertsMoE | FusedSlotRowsMoE) and module.experts.is_monolithic:
            raise PreparedCheckpointMismatch(
                f"moeprep: vLLM chose a monolithic MoE kernel for {name}, which routes by itself and would skip "
                "the shared-expert slots; select a modular MoE backend (e.g. --moe-backend triton)"
            )


FUSED_MODELS = {
    "MoeprepFusedDeepseekV3ForCausalLM": (
        "vllm.model_executor.models.deepseek_v2",
        "DeepseekV3ForCausalLM",
        "DeepseekV2MoE",
        deepseek_routing,
        "DeepseekV2MLP",
    ),
    "MoeprepFusedGlm4MoeForCausalLM": (
        "vllm.model_executor.models.glm4_moe",
        "Glm4MoeForCausalLM",
        "Glm4MoE",
        glm4_moe_routing,
        "Glm4MoeMLP",
    ),
    "MoeprepFusedQwen2MoeForCausalLM": (
        "vllm.model_executor.models.qwen2_moe",
        "Qwen2MoeForCausalLM",
        "Qwen2MoeSparseMoeBlock",
        qwen2_moe_routing,
    ),
    "MoeprepFusedLlama4ForCausalLM": ("vllm.model_executor.models.llama4", "Llama4ForCausalLM", "Llama4MoE", None),
}


def __getattr__(name: str) -> type:
    """Model classes are built on first use, so registering them does not import every vLLM model."""
    if name not in FUSED_MODELS:
        raise AttributeError(name)
    cls = fused_model_class(name, *FUSED_MODELS[name])
    globals()[name] = cls
    return cls


def register_fused_models() -> None:
    from vllm import ModelRegistry

    for arch in FUSED_MODELS:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{__name__}:{arch}")
