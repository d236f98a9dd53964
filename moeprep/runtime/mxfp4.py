"""Prepared gpt-oss mxfp4 experts for vLLM 0.26: the experts module gets the prepared parameters
(``moeprep_w13_*`` ...) in their stored shapes, vLLM's loader copies the bytes in, and post-processing
only hands them to vLLM's kernel as the tensors vLLM would have built. Nothing is re-laid-out."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod

from moeprep.checkpoint.manifest import TensorRecord
from moeprep.runtime.errors import PreparedCheckpointMismatch
from moeprep.runtime.prepared_params import PreparedExpertParams, PreparedWeightsMixin, expert_param_names
from moeprep.runtime.tracking import PreparedTensorTracker


def running_arch() -> str:
    return "sm{}{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else "no GPU"


class PreparedMxfp4MoEMethod(PreparedWeightsMixin, GptOssMxfp4MoEMethod):
    """vLLM's gpt-oss mxfp4 MoE method with the load-time transform replaced by prepared bytes."""

    PARAMS: ClassVar[tuple[str, ...]]
    BACKENDS: ClassVar[frozenset[str]]  # vLLM Mxfp4MoeBackend names this layout is for (empty: any)
    LAYOUT: ClassVar[str]

    def __init__(
        self, moe: Any, prefix: str, records: dict[str, TensorRecord], knobs: dict, tracker: PreparedTensorTracker
    ) -> None:
        """``records``: the manifest records of this module's prepared tensors, by full tensor name."""
        super().__init__(moe)
        if self.BACKENDS and self.mxfp4_backend.name not in self.BACKENDS:
            raise PreparedCheckpointMismatch(
                f"moeprep: vLLM selected the {self.mxfp4_backend.name} mxfp4 MoE backend for {prefix}, but this "
                f"folder holds {self.LAYOUT} layouts; serve with that backend or convert again"
            )
        arch = knobs.get("arch", "any")
        if arch != "any" and arch != running_arch():
            raise PreparedCheckpointMismatch(
                f"moeprep: this folder holds {self.LAYOUT} layouts for {arch}, but the GPU is {running_arch()}; "
                f"convert again with --arch {running_arch()}"
            )
        self.params = PreparedExpertParams(self.PARAMS, prefix, records, tracker)
        self.prefix, self.knobs, self.tracker = prefix, knobs, tracker

    def process_weights_after_loading(self, layer: Any) -> None:
        self.params.check_all_loaded()
        layer.register_parameter("w13_bias", layer.moeprep_w13_bias)
        layer.register_parameter("w2_bias", layer.moeprep_w2_bias)
        self.install(layer)
        for name in self.PARAMS:
            delattr(layer, name)  # the installed tensors keep the storage alive
        self.build_kernel(layer)
        self.tracker.layer_ready(self.prefix)

    def build_kernel(self, layer: Any) -> None:
        """vLLM's MoE kernel over the installed tensors."""
        from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import make_mxfp4_moe_kernel

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

    def install(self, layer: Any) -> None:
        """Give vLLM's kernel the prepared weights and scales in the objects it expects."""
        raise NotImplementedError


class PreparedTritonMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``OAITritonMxfp4Experts`` (triton_kernels ``matmul_ogs``) on sm90."""

    PARAMS = expert_param_names("value", "scale", "bias")
    BACKENDS = frozenset({"TRITON", "TRITON_UNFUSED"})
    LAYOUT = "triton (matmul_ogs)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.knobs.get("arch") != "sm90":
            raise PreparedCheckpointMismatch(
                f"moeprep: serving triton layouts for {self.knobs.get('arch')} is not verified on such a GPU yet "
                "(only sm90 is); convert with --backend marlin, or serve the original checkpoint"
            )

    def install(self, layer: Any) -> None:
        import triton_kernels.matmul_ogs_details.opt_flags as opt_flags
        from triton_kernels.matmul_ogs import FlexCtx, PrecisionConfig
        from triton_kernels.numerics import InFlexData
        from triton_kernels.tensor import FP4, Storage, Tensor
        from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout

        opt_flags.update_opt_flags_constraints({"split_k": 1})  # what vLLM's _swizzle_mxfp4 sets on sm90
        num_warps = int(self.knobs.get("num_warps", 8))

        def value(name: str, k: int, n: int) -> Tensor:
            """As ``convert_layout(wrap_torch_tensor(w.mT, FP4), HopperMXValueLayout)`` left it."""
            layout = HopperMXValueLayout([self.num_experts, k // 2, n], mx_axis=1)
            return Tensor(Storage(getattr(layer, name).data.mT, layout), dtype=FP4, shape=[self.num_experts, k, n])

        def scale(name: str, k: int, n: int) -> Tensor:
            groups = (k // 32 + 3) // 4 * 4  # vLLM pads scale groups to 0 mod 4 on sm90
            layout = HopperMXScaleLayout([self.num_experts, groups, n], mx_axis=1, num_warps=num_warps)
            data = getattr(layer, name).data.mT
            return Tensor(Storage(data, layout), dtype=torch.uint8, shape=[self.num_experts, groups, n])

        w13_rows, w2_rows = 2 * self.intermediate_size, self.hidden_size
        layer.w13_weight = value("moeprep_w13_value", self.hidden_size, w13_rows)
        layer.w2_weight = value("moeprep_w2_value", self.intermediate_size, w2_rows)
        w13_scale = scale("moeprep_w13_scale", self.hidden_size, w13_rows)
        w2_scale = scale("moeprep_w2_scale", self.intermediate_size, w2_rows)
        self.w13_precision_config = PrecisionConfig(weight_scale=w13_scale, flex_ctx=FlexCtx(rhs_data=InFlexData()))
        self.w2_precision_config = PrecisionConfig(weight_scale=w2_scale, flex_ctx=FlexCtx(rhs_data=InFlexData()))


# vLLM's names of the expert weights and scales -> the prepared parameters holding them
WEIGHTS_AND_SCALES = (
    ("w13_weight", "moeprep_w13_weight"),
    ("w2_weight", "moeprep_w2_weight"),
    ("w13_weight_scale", "moeprep_w13_scale"),
    ("w2_weight_scale", "moeprep_w2_scale"),
)


def register_as_vllm_params(layer: Any) -> None:
    for vllm_name, name in WEIGHTS_AND_SCALES:
        layer.register_parameter(vllm_name, getattr(layer, name))


class PreparedMarlinMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``MarlinExperts`` (bf16 activations): weights, scales and biases are plain parameters."""

    PARAMS = expert_param_names("weight", "scale", "bias")
    BACKENDS = frozenset({"MARLIN", "BATCHED_MARLIN"})
    LAYOUT = "Marlin"

    def install(self, layer: Any) -> None:
        register_as_vllm_params(layer)


class PaddedMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``--backend none``: vLLM's mxfp4 parameters padded offline for the kernel vLLM picks on the folder's arch;
    vLLM's own kernel transform runs at load (a kernel with other padding is refused by the size check)."""

    PARAMS = expert_param_names("weight", "scale", "bias")
    BACKENDS = frozenset()
    LAYOUT = "padded (untransformed) mxfp4"

    def install(self, layer: Any) -> None:
        register_as_vllm_params(layer)

    def build_kernel(self, layer: Any) -> None:
        GptOssMxfp4MoEMethod.process_weights_after_loading(self, layer)


PREPARED_METHODS: dict[str, type[PreparedMxfp4MoEMethod]] = {
    "triton": PreparedTritonMxfp4MoEMethod,
    "marlin": PreparedMarlinMxfp4MoEMethod,
    "none": PaddedMxfp4MoEMethod,
}
