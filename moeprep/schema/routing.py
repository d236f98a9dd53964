"""The routing contract of fused shared experts (the manifest's ``routing.fused_shared_experts``): written by the
converter (``shared_experts.routing_contract``), read by the plugin (``runtime.fused_shared``), checked here.

The shared expert of every MoE layer is cloned into ``slots`` x ``replicas`` extra expert slots after the
``routed_experts``; slot ``s`` replica ``r`` is expert ``slot_ids[s][r]``, and token ``t`` uses replica
``t % replicas`` of every slot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from moeprep.schema.typed_json import FieldTypeError, from_json

ROUTING_KEY = "fused_shared_experts"  # under the manifest's ``routing``
CONTRACT_VERSION = 1
SLOT_WEIGHT_ONE = "1"
SLOT_WEIGHT_GATED = "sigmoid(shared_expert_gate(x))"
REPLICA_RULE = "token_index % replicas"


@dataclass(frozen=True)
class FusedSharedExperts:
    """How the plugin routes to the slots, and what a reader needs to know of the fused layer."""

    version: int
    routed_experts: int
    slots: int
    replicas: int
    slot_ids: tuple[tuple[int, ...], ...]  # [slot][replica] -> the MoE layer's expert id
    replica_rule: str
    num_experts: int  # routed_experts + slots * replicas
    top_k: int
    fused_top_k: int
    router_weight_on_input: bool
    slot_placement: str
    expert_intermediate: int
    shared_intermediate: int
    slot_weight: str  # SLOT_WEIGHT_ONE or SLOT_WEIGHT_GATED
    shared_gate_row: int | None  # the router row of the shared-expert gate, where the family has one
    routed_scaling_factor: float
    routed_scaling_applied_to: str
    renormalize: bool
    renormalize_excludes_slots: bool
    original_architectures: tuple[str, ...]
    architecture: str
    slots_requantized: str | None
    mtp_layers: tuple[int, ...]
    mtp_shared_experts: str | None
    # With ``--ep``: how the slots are spread over the ranks, and the layer id of each router expert.
    placement: str | None = None
    routed_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.version != CONTRACT_VERSION:
            raise FieldTypeError(f"routing contract: version {self.version} is not {CONTRACT_VERSION}")
        if self.num_experts != self.routed_experts + self.slots * self.replicas:
            raise FieldTypeError("routing contract: num_experts is not routed_experts + slots * replicas")
        shape = [len(replicas) for replicas in self.slot_ids]
        if shape != [self.replicas] * self.slots:
            raise FieldTypeError(f"routing contract: slot_ids is not [{self.slots}][{self.replicas}] expert ids")
        ids = [e for replicas in self.slot_ids for e in replicas] + list(self.routed_ids or range(self.routed_experts))
        if sorted(ids) != list(range(self.num_experts)):
            raise FieldTypeError("routing contract: slot_ids and routed_ids do not name every expert of the layer once")
        if self.slot_weight not in (SLOT_WEIGHT_ONE, SLOT_WEIGHT_GATED):
            raise FieldTypeError(f"routing contract: slot_weight {self.slot_weight!r} is unknown")
        if (self.shared_gate_row is not None) != (self.slot_weight == SLOT_WEIGHT_GATED):
            raise FieldTypeError("routing contract: shared_gate_row is given exactly where the slot weight is gated")

    @property
    def gated(self) -> bool:
        return self.shared_gate_row is not None

    @classmethod
    def of(
        cls,
        routed_experts: int,
        slots: int,
        replicas: int,
        top_k: int,
        expert_intermediate: int,
        gated: bool,
        routed_scaling_factor: float = 1.0,
        renormalize: bool = True,
        router_weight_on_input: bool = False,
        shared_intermediate: int | None = None,
        architecture: str = "",
        original_architectures: tuple[str, ...] = (),
        slots_requantized: str | None = None,
        mtp_layers: tuple[int, ...] = (),
    ) -> FusedSharedExperts:
        """The contract of ``slots`` x ``replicas`` slots after ``routed_experts`` (replicas of a slot
        adjacent), with the fields that follow from these derived."""
        return cls(
            version=CONTRACT_VERSION,
            routed_experts=routed_experts,
            slots=slots,
            replicas=replicas,
            slot_ids=tuple(tuple(routed_experts + s * replicas + r for r in range(replicas)) for s in range(slots)),
            replica_rule=REPLICA_RULE,
            num_experts=routed_experts + slots * replicas,
            top_k=top_k,
            fused_top_k=top_k if router_weight_on_input else top_k + slots,
            router_weight_on_input=router_weight_on_input,
            slot_placement="one extra row per slot and token, each routed to its slot alone"
            if router_weight_on_input
            else "slots appended to every token's routed top-k",
            expert_intermediate=expert_intermediate,
            shared_intermediate=expert_intermediate * slots if shared_intermediate is None else shared_intermediate,
            slot_weight=SLOT_WEIGHT_GATED if gated else SLOT_WEIGHT_ONE,
            shared_gate_row=routed_experts if gated else None,
            routed_scaling_factor=routed_scaling_factor,
            routed_scaling_applied_to="routed weights, in the router (slot weights are not scaled)",
            renormalize=renormalize,
            renormalize_excludes_slots=True,
            original_architectures=tuple(original_architectures),
            architecture=architecture,
            slots_requantized=slots_requantized,
            mtp_layers=tuple(mtp_layers),
            mtp_shared_experts="stored as in the source, not fused: vLLM's MTP draft model loads the MTP layers "
            "with the original architecture"
            if mtp_layers
            else None,
        )

    def spread(self, placement: str, routed_ids: list[int], slot_ids: list[list[int]]) -> FusedSharedExperts:
        """This contract with the experts placed over expert-parallel ranks (``rank_shards.SpreadSlotPlacement``)."""
        return replace(
            self,
            placement=placement,
            routed_ids=tuple(routed_ids),
            slot_ids=tuple(tuple(replicas) for replicas in slot_ids),
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON (lists for tuples; the EP fields only where the experts were spread)."""
        data = asdict(self)
        for key in ("placement", "routed_ids"):
            if data[key] is None:
                del data[key]
        return _lists(data)

    @classmethod
    def from_json(cls, data: Any, where: str = f"routing.{ROUTING_KEY}") -> FusedSharedExperts:
        """The contract of a manifest's ``routing.fused_shared_experts``; raises FieldTypeError naming what is
        wrong."""
        return from_json(cls, data, where)


def fused_shared_experts(routing: dict[str, Any] | None) -> FusedSharedExperts | None:
    """The contract in a manifest's ``routing``, or None where the folder has no fused shared experts (the
    manifest was checked when it was loaded, ``Manifest.from_dict``)."""
    data = (routing or {}).get(ROUTING_KEY)
    return None if data is None else FusedSharedExperts.from_json(data)


def routing_json(contract: FusedSharedExperts | None) -> dict[str, Any] | None:
    """The manifest's ``routing`` for ``contract``."""
    return None if contract is None else {ROUTING_KEY: contract.to_json()}


def _lists(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    return value
