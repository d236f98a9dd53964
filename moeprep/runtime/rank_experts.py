"""Per-rank expert folders (``convert --tp N`` / ``--ep N``): each rank fills its experts from its own files.

vLLM's loader reads the replicated shards the index lists; the per-rank files are not in the index, so
no rank reads another's experts. This method is vLLM's own unquantized MoE method; before vLLM's
post-processing it copies this rank's tensors into ``w13_weight`` ([gate; up] per expert) and ``w2_weight``,
exactly where vLLM's expert weight loader would have put them: under tensor parallelism this rank's slice of
every expert, under expert parallelism the whole experts vLLM's expert map gives this rank, at their local
index.

vLLM CPU 0.32's unquantized MoE kernel takes the router's global expert ids but ignores the expert map, so under
expert parallelism it reads past this rank's experts (a crash, with original checkpoints too). On that kernel
this method hands it local ids: experts of other ranks go to local expert 0 at weight 0 (their share comes
from the rank that holds them, through vLLM's usual all-reduce).
"""

from __future__ import annotations

from pathlib import Path

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEConfig, UnquantizedFusedMoEMethod

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.runtime.rank_files import each_rank_tensor
from moeprep.runtime.tracking import PreparedTensorTracker
from moeprep.schema.manifest import TensorRecord
from moeprep.schema.names import parse_expert_tensor


class RankExpertsMoEMethod(UnquantizedFusedMoEMethod):
    """vLLM's unquantized MoE method, with the expert weights read from this rank's files."""

    def __init__(
        self,
        moe: FusedMoEConfig,
        folder: Path,
        prefix: str,
        records: dict[str, TensorRecord],
        tracker: PreparedTensorTracker,
    ) -> None:
        super().__init__(moe)
        self.folder, self.prefix, self.records, self.tracker = folder, prefix, records, tracker
        self.local_ids_only = False  # the selected kernel ignores vLLM's expert map (set once it is built)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not self.records:
            raise PreparedCheckpointMismatch(f"moeprep: this rank's files hold no experts for {self.prefix}")
        for name, tensor in each_rank_tensor(self.folder, self.records):
            self._copy(layer, name, tensor)
            self.tracker.tensor_loaded(name)
        super().process_weights_after_loading(layer)
        self.local_ids_only = layer.expert_map is not None and kernel_ignores_expert_map(self.moe_kernel)
        self.tracker.layer_ready(self.prefix)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        if self.local_ids_only:
            topk_weights, topk_ids = local_routing(layer.expert_map, topk_weights, topk_ids)
        return super().apply(layer, x, topk_weights, topk_ids, *args, **kwargs)

    def _copy(self, layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        parsed = parse_expert_tensor(name)
        assert parsed is not None and parsed.kind == "weight", name
        expert, proj = local_expert(layer, parsed.expert, name), parsed.proj
        width = layer.w2_weight.shape[-1]  # this rank's intermediate size
        target = {
            "gate_proj": layer.w13_weight.data[expert, :width],
            "up_proj": layer.w13_weight.data[expert, width:],
            "down_proj": layer.w2_weight.data[expert],
        }[proj]
        if target.shape != tensor.shape:
            raise PreparedCheckpointMismatch(
                f"moeprep: {name} in this rank's file is {list(tensor.shape)}, vLLM's parameter slice is "
                f"{list(target.shape)}; serve with the tensor-parallel size the folder was converted for"
            )
        target.copy_(tensor)


def local_expert(layer: torch.nn.Module, expert: int, name: str) -> int:
    """The index in this rank's parameters of global ``expert`` (the same without expert parallelism)."""
    if layer.expert_map is None:
        return expert
    local = int(layer.expert_map[expert])
    if local < 0:
        raise PreparedCheckpointMismatch(
            f"moeprep: {name} is in this rank's file, but vLLM places expert {expert} on another rank; serve with "
            "vLLM's default (linear) expert placement, which convert --ep wrote the rank files for"
        )
    return local


def kernel_ignores_expert_map(kernel: object) -> bool:
    """vLLM CPU's unquantized experts kernel, which reads the router's ids as local ones."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    return isinstance(getattr(kernel, "fused_experts", None), CPUUnquantizedExperts)


def local_routing(
    expert_map: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global expert ids -> this rank's local ids; experts held by other ranks -> local 0 at weight 0."""
    local = expert_map[topk_ids.long()]
    elsewhere = local < 0
    ids = local.clamp(min=0).to(topk_ids.dtype).contiguous()
    return topk_weights.masked_fill(elsewhere, 0).contiguous(), ids
