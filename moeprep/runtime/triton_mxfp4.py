"""Prepared ``triton`` mxfp4 experts for vLLM 0.26 (``OAITritonMxfp4Experts`` on sm90).

The experts module gets the prepared parameters (``moeprep_w13_value`` ...) in their stored shapes;
vLLM's loader copies the bytes in; post-processing only wraps them as triton_kernels tensors, exactly
as ``_swizzle_mxfp4`` would have produced them, and builds vLLM's kernel. Nothing is re-swizzled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod

from moeprep.checkpoint.manifest import TensorRecord
from moeprep.runtime.errors import PreparedCheckpointMismatch
from moeprep.runtime.tracking import PreparedTensorTracker

PARAMS = (
    "moeprep_w13_value",
    "moeprep_w13_scale",
    "moeprep_w13_bias",
    "moeprep_w2_value",
    "moeprep_w2_scale",
    "moeprep_w2_bias",
)
STORAGE_DTYPES = {"U8": torch.uint8, "F32": torch.float32}


class PreparedTritonMxfp4MoEMethod(GptOssMxfp4MoEMethod):
    """vLLM's gpt-oss mxfp4 MoE method with the load-time swizzle replaced by prepared bytes."""

    def __init__(self, moe, prefix: str, records: dict[str, TensorRecord], knobs: dict, tracker: PreparedTensorTracker):  # type: ignore[no-untyped-def]
        """``records``: the manifest records of this module's prepared tensors, by full tensor name."""
        super().__init__(moe)
        from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import TRITON_BACKENDS

        if self.mxfp4_backend not in TRITON_BACKENDS:
            raise PreparedCheckpointMismatch(
                f"moeprep: vLLM selected the {self.mxfp4_backend.name} mxfp4 MoE backend for {prefix}, but this "
                "folder holds triton (matmul_ogs) layouts; serve with the Triton mxfp4 backend or convert again"
            )
        arch = knobs.get("arch")
        running = "sm{}{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else "no GPU"
        if arch != running:
            raise PreparedCheckpointMismatch(
                f"moeprep: this folder holds triton layouts for {arch}, but the GPU is {running}; "
                f"convert again with --backend triton --arch {running}"
            )
        self.names = {name.rpartition(".")[2]: name for name in records}
        self.records = {param: records[name] for param, name in self.names.items()}
        missing = [p for p in PARAMS if p not in self.records]
        if missing:
            raise PreparedCheckpointMismatch(f"moeprep: manifest has no {prefix}.{missing[0]}; convert again")
        self.prefix, self.knobs, self.tracker = prefix, knobs, tracker
        self.loaded: set[str] = set()

    def create_weights(
        self,
        layer,
        num_experts,
        hidden_size,
        intermediate_size_per_partition,
        params_dtype,  # type: ignore[no-untyped-def]
        **extra_weight_attrs,
    ):
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size_per_partition,
        )
        layer.params_dtype, layer.num_experts = params_dtype, num_experts
        bias_rows = (self.records["moeprep_w13_bias"].shape[1], self.records["moeprep_w2_bias"].shape[1])
        if (
            bias_rows != (2 * intermediate_size_per_partition, hidden_size)
            or self.records["moeprep_w13_bias"].shape[0] != num_experts
        ):
            raise PreparedCheckpointMismatch(
                f"moeprep: {self.prefix} was prepared for {self.records['moeprep_w13_bias'].shape[0]} experts, "
                f"intermediate {bias_rows[0] // 2}, hidden {bias_rows[1]}; vLLM built {num_experts} experts, "
                f"intermediate {intermediate_size_per_partition}, hidden {hidden_size} (different TP/EP or padding); "
                "convert again for this configuration"
            )
        for name in PARAMS:
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
                    f"moeprep: {self.prefix}.{name} is {loaded.dtype}{list(loaded.shape)} in the checkpoint, "
                    f"expected {param.dtype}{list(param.shape)}; the folder does not match its manifest"
                )
            param.data.copy_(loaded)
            self.loaded.add(name)
            self.tracker.tensor_loaded(self.names[name])

        return load

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        import triton_kernels.matmul_ogs_details.opt_flags as opt_flags
        from triton_kernels.matmul_ogs import FlexCtx, PrecisionConfig
        from triton_kernels.numerics import InFlexData
        from triton_kernels.tensor import FP4, Storage, Tensor
        from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout
        from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import make_mxfp4_moe_kernel

        missing = [p for p in PARAMS if p not in self.loaded]
        if missing:
            raise PreparedCheckpointMismatch(f"moeprep: {self.names[missing[0]]} was never loaded; convert again")
        opt_flags.update_opt_flags_constraints({"split_k": 1})  # what vLLM's _swizzle_mxfp4 sets on sm90
        num_warps = int(self.knobs.get("num_warps", 8))

        def value(name: str) -> Tensor:
            data = getattr(layer, name).data.mT  # [E, K/2 bytes, N] as the swizzle left it
            e, k_bytes, n = self._unpadded_value_shape(name)
            layout = HopperMXValueLayout([e, k_bytes, n], mx_axis=1)
            return Tensor(Storage(data, layout), dtype=FP4, shape=[e, 2 * k_bytes, n])

        def scale(name: str, k_groups: int, n: int) -> Tensor:
            data = getattr(layer, name).data.mT
            layout = HopperMXScaleLayout([self.num_experts, k_groups, n], mx_axis=1, num_warps=num_warps)
            return Tensor(Storage(data, layout), dtype=torch.uint8, shape=[self.num_experts, k_groups, n])

        w13_rows, w2_rows = 2 * self.intermediate_size, self.hidden_size
        w13, w2 = value("moeprep_w13_value"), value("moeprep_w2_value")
        w13_scale = scale("moeprep_w13_scale", _round4(self.hidden_size // 32), w13_rows)
        w2_scale = scale("moeprep_w2_scale", _round4(self.intermediate_size // 32), w2_rows)
        layer.register_parameter("w13_bias", layer.moeprep_w13_bias)  # already float32, padded
        layer.register_parameter("w2_bias", layer.moeprep_w2_bias)
        for name in PARAMS:
            delattr(layer, name)  # the triton tensors and the bias parameters keep the storage alive
        layer.w13_weight, layer.w2_weight = w13, w2
        self.w13_precision_config = PrecisionConfig(weight_scale=w13_scale, flex_ctx=FlexCtx(rhs_data=InFlexData()))
        self.w2_precision_config = PrecisionConfig(weight_scale=w2_scale, flex_ctx=FlexCtx(rhs_data=InFlexData()))
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        if self.moe_quant_config is not None and self.experts_cls is not None:
            self.moe_kernel = make_mxfp4_moe_kernel(
                moe_quant_config=self.moe_quant_config,
                moe_config=self.moe,
                mxfp4_backend=self.mxfp4_backend,
                experts_cls=self.experts_cls,
                routing_tables=layer._expert_routing_tables(),
                layer=layer,
            )
        self.tracker.layer_ready(self.prefix)

    def _unpadded_value_shape(self, name: str) -> tuple[int, int, int]:
        """[E, K bytes, N] of the tensor vLLM swizzled (before the layout's own padding)."""
        if name == "moeprep_w13_value":
            return self.num_experts, self.hidden_size // 2, 2 * self.intermediate_size
        return self.num_experts, self.intermediate_size // 2, self.hidden_size


def _round4(groups: int) -> int:
    return -(-groups // 4) * 4
