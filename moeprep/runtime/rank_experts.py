"""Tensor-parallel folders (``convert --tp N``): each rank fills its experts from its own files.

vLLM's loader reads the replicated shards the index lists; the per-rank files are not in the index, so
no rank reads another's experts. This method is vLLM's own unquantized MoE method; before vLLM's
post-processing it copies this rank's gate/up/down slices into ``w13_weight`` ([gate; up] per expert) and
``w2_weight``, exactly where vLLM's expert weight loader would have put them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEConfig, UnquantizedFusedMoEMethod

from moeprep.checkpoint.manifest import TensorRecord
from moeprep.runtime.errors import PreparedCheckpointMismatch
from moeprep.runtime.rank_files import each_rank_tensor
from moeprep.runtime.tracking import PreparedTensorTracker

EXPERT_TENSOR = re.compile(r".*\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


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

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not self.records:
            raise PreparedCheckpointMismatch(f"moeprep: this rank's files hold no experts for {self.prefix}")
        for name, tensor in each_rank_tensor(self.folder, self.records):
            self._copy(layer, name, tensor)
            self.tracker.tensor_loaded(name)
        super().process_weights_after_loading(layer)
        self.tracker.layer_ready(self.prefix)

    def _copy(self, layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        match = EXPERT_TENSOR.fullmatch(name)
        assert match is not None, name
        expert, proj = int(match[1]), match[2]  # without expert parallelism every rank holds every expert
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
