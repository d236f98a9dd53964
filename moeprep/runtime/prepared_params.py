"""Prepared expert parameters of one MoE layer: registered on vLLM's experts module in their stored
shapes, filled by vLLM's loader byte for byte, and checked to be complete before post-processing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.runtime.tracking import PreparedTensorTracker
from moeprep.schema.manifest import TensorRecord
from moeprep.schema.names import PREPARED_W2, PREPARED_W13

STORAGE_DTYPES = {
    "U8": torch.uint8,
    "I32": torch.int32,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F8_E8M0": torch.float8_e8m0fnu,
}


class PreparedWeightsMixin:
    """``create_weights`` of a MoE method whose parameters are the prepared tensors in ``self.params``."""

    params: PreparedExpertParams

    def create_weights(
        self,
        layer: Any,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size_per_partition
        layer.params_dtype, layer.num_experts = params_dtype, num_experts
        self.params.check_dims(num_experts, intermediate_size_per_partition, hidden_size)
        self.params.register(layer)


class PreparedExpertParams:
    """The manifest records of one experts module's prepared tensors (``moeprep_w13_*`` ...)."""

    def __init__(
        self, names: tuple[str, ...], prefix: str, records: dict[str, TensorRecord], tracker: PreparedTensorTracker
    ) -> None:
        """``records``: this module's prepared tensors by full tensor name; ``names``: the parameters needed."""
        self.full_names = {name.rpartition(".")[2]: name for name in records}
        self.records = {param: records[name] for param, name in self.full_names.items()}
        missing = [p for p in names if p not in self.records]
        if missing:
            raise PreparedCheckpointMismatch(f"moeprep: manifest has no {prefix}.{missing[0]}; convert again")
        self.names, self.prefix, self.tracker = names, prefix, tracker
        self.loaded: set[str] = set()

    def check_dims(self, experts: int, intermediate: int, hidden: int) -> None:
        """The layer vLLM built has the (experts, intermediate, hidden) sizes the biases were prepared for."""
        w13_bias, w2_bias = self.records[f"{PREPARED_W13}_bias"], self.records[f"{PREPARED_W2}_bias"]
        prepared = (w13_bias.shape[0], w13_bias.shape[1] // 2, w2_bias.shape[1])
        if prepared != (experts, intermediate, hidden):
            raise PreparedCheckpointMismatch(
                f"moeprep: {self.prefix} was prepared for (experts, intermediate, hidden) = {prepared}; vLLM built "
                f"{(experts, intermediate, hidden)} (another TP/EP size or backend padding); "
                "convert again for this configuration"
            )

    def register(self, layer: Any) -> None:
        """Add every prepared parameter to ``layer``, empty, in its stored shape and dtype."""
        for name in self.names:
            record = self.records[name]
            param = torch.nn.Parameter(
                torch.empty(record.stored_shape, dtype=STORAGE_DTYPES[record.dtype]), requires_grad=False
            )
            param.weight_loader = self._loader(name)  # type: ignore[attr-defined]
            layer.register_parameter(name, param)

    def _loader(self, name: str) -> Callable[..., None]:
        def load(param: torch.nn.Parameter, loaded: torch.Tensor, *args: object, **kwargs: object) -> None:
            if tuple(loaded.shape) != tuple(param.shape) or loaded.dtype != param.dtype:
                raise PreparedCheckpointMismatch(
                    f"moeprep: {self.full_names[name]} is {loaded.dtype}{list(loaded.shape)} in the checkpoint, "
                    f"expected {param.dtype}{list(param.shape)}; the folder does not match its manifest"
                )
            param.data.copy_(loaded)
            self.loaded.add(name)
            self.tracker.tensor_loaded(self.full_names[name])

        return load

    def load_rank_files(self, layer: Any, folder: Path) -> None:
        """Fill the parameters from this rank's own files (vLLM's loader does not read them)."""
        from moeprep.runtime.rank_files import each_rank_tensor

        by_full_name = {full: short for short, full in self.full_names.items()}
        for name, tensor in each_rank_tensor(folder, {self.full_names[p]: self.records[p] for p in self.names}):
            short = by_full_name[name]
            self._loader(short)(getattr(layer, short), tensor)

    def taken_from_weight_cache(self) -> None:
        """vLLM's weight cache supplies this layer post-processed (the cache's own load was checked): count every
        prepared tensor as loaded."""
        for name in self.names:
            self.loaded.add(name)
            self.tracker.tensor_loaded(self.full_names[name])

    def check_all_loaded(self) -> None:
        missing = [p for p in self.names if p not in self.loaded]
        if missing:
            raise PreparedCheckpointMismatch(f"moeprep: {self.full_names[missing[0]]} was never loaded; convert again")
