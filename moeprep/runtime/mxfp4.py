"""Prepared gpt-oss mxfp4 experts: the experts module gets the prepared parameters (``moeprep_w13_*`` ...) in
their stored shapes, vLLM's loader copies the bytes in, and post-processing hands them to vLLM's own kernel
setup as the result of its weight conversion (``vllm_compat``). Nothing is re-laid-out.

The Triton and Marlin methods also serve from vLLM's weight cache (``vllm preload`` + ``--load-format
ipc_cache``): the cache holds the tensors post-processing left on the layer, under vLLM's names, and the
engine's post-processing only rebuilds the kernel around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.runtime.prepared_params import PreparedExpertParams, PreparedWeightsMixin
from moeprep.runtime.tracking import PreparedTensorTracker
from moeprep.runtime.vllm_compat import (
    KernelTensors,
    check_bundled_triton_kernels,
    keep_params_in_triton_tensors,
    lora_hands_triton_kernels_raw_weights,
    setup_prepared_kernel,
    triton_params_kept,
    triton_precision_config,
    weights_pre_processed,
)
from moeprep.schema.manifest import TensorRecord
from moeprep.schema.names import prepared_param_names

# Prepared parameters of the Marlin and padded layouts in the order of vLLM's conversion results (w13, w2,
# their scales, their biases), and vLLM's own names of those tensors.
PREPARED_ORDER = tuple(name for part in ("weight", "scale", "bias") for name in prepared_param_names(part))
VLLM_ORDER = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias")


def running_arch() -> str:
    return "sm{}{}".format(*torch.cuda.get_device_capability())


class PreparedMxfp4MoEMethod(PreparedWeightsMixin, GptOssMxfp4MoEMethod):
    """vLLM's gpt-oss mxfp4 MoE method with the load-time transform replaced by prepared bytes."""

    PARAMS: ClassVar[tuple[str, ...]]
    BACKENDS: ClassVar[frozenset[str]]  # vLLM Mxfp4MoeBackend names this layout is for (empty: any)
    LAYOUT: ClassVar[str]

    def __init__(
        self,
        moe: Any,
        prefix: str,
        records: dict[str, TensorRecord],
        knobs: dict,
        tracker: PreparedTensorTracker,
        rank_folder: Path | None = None,
    ) -> None:
        """``records``: the manifest records of this module's prepared tensors, by full tensor name;
        ``rank_folder``: the folder whose rank files hold them (``convert --tp N``, CPU layouts only)."""
        self.check_machine()
        arch = knobs.get("arch", "any")
        if arch != "any" and arch != running_arch():
            raise PreparedCheckpointMismatch(
                f"moeprep: this folder holds {self.LAYOUT} layouts for {arch}, but the GPU is {running_arch()}; "
                f"convert again with --arch {running_arch()}"
            )
        super().__init__(moe)
        if self.BACKENDS and self.mxfp4_backend.name not in self.BACKENDS:
            raise PreparedCheckpointMismatch(
                f"moeprep: vLLM selected the {self.mxfp4_backend.name} mxfp4 MoE backend for {prefix}, but this "
                f"folder holds {self.LAYOUT} layouts; serve with that backend or convert again"
            )
        self.params = PreparedExpertParams(self.PARAMS, prefix, records, tracker)
        self.prefix, self.knobs, self.tracker, self.rank_folder = prefix, knobs, tracker, rank_folder

    def check_machine(self) -> None:
        """Refuse a machine whose vLLM has no kernel for this layout."""
        if not torch.cuda.is_available():
            raise PreparedCheckpointMismatch(
                f"moeprep: this folder holds {self.LAYOUT} layouts, which need a CUDA GPU; on this machine "
                "convert with --backend auto (vLLM CPU), or serve the original checkpoint"
            )

    def process_weights_after_loading(self, layer: Any) -> None:
        if weights_pre_processed():
            tensors = self.cached_kernel_tensors(layer)
            self.params.taken_from_weight_cache()
        else:
            if self.rank_folder is not None:
                self.params.load_rank_files(layer, self.rank_folder)
            self.params.check_all_loaded()
            tensors = self.kernel_tensors(layer)
        for name in self.PARAMS:
            delattr(layer, name)  # the kernel tensors keep the storage alive
        setup_prepared_kernel(self, layer, self.conversion_result(tensors), lambda: self.on_converted(layer, tensors))
        self.tracker.layer_ready(self.prefix)

    def kernel_tensors(self, layer: Any) -> KernelTensors:
        """The prepared (w13, w2, w13 scale, w2 scale, w13 bias, w2 bias) as the kernel reads them: by default the
        loaded parameters themselves (layouts the kernel reads as plain tensors)."""
        return tuple(getattr(layer, name).data for name in PREPARED_ORDER)  # type: ignore[return-value]

    def cached_kernel_tensors(self, layer: Any) -> KernelTensors:
        """The same, from the tensors vLLM's weight cache put on the layer under vLLM's names."""
        raise PreparedCheckpointMismatch(
            f"moeprep: {self.LAYOUT} layouts cannot be served from vLLM's weight cache; load from disk"
        )

    def conversion_result(self, tensors: KernelTensors) -> KernelTensors:
        """``tensors`` in the objects vLLM's weight conversion returns for this backend."""
        return tensors

    def on_converted(self, layer: Any, tensors: KernelTensors) -> None:
        """What vLLM's conversion does to the layer besides returning the converted tensors."""


class PreparedTritonMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``OAITritonMxfp4Experts`` (triton_kernels ``matmul_ogs``) on sm90."""

    PARAMS = prepared_param_names("value", "scale", "bias")
    BACKENDS = frozenset({"TRITON", "TRITON_UNFUSED"})
    LAYOUT = "triton (matmul_ogs)"

    @property
    def supports_pre_processed_weights(self) -> bool:  # type: ignore[override]
        """The weight cache can hand the Triton tensors over where vLLM keeps them as layer parameters."""
        return triton_params_kept()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.knobs.get("arch") != "sm90":
            raise PreparedCheckpointMismatch(
                f"moeprep: serving triton layouts for {self.knobs.get('arch')} is not verified on such a GPU yet "
                "(only sm90 is); convert with --backend marlin, or serve the original checkpoint"
            )
        if getattr(self.moe, "is_lora_enabled", False) and lora_hands_triton_kernels_raw_weights():
            raise PreparedCheckpointMismatch(
                "moeprep: this vLLM's MoE LoRA hands the unfused Triton kernel the raw weight instead of its Triton "
                "tensor and fails, for vLLM's own gpt-oss too; serve LoRA on a folder converted with --backend marlin"
            )

    def kernel_tensors(self, layer: Any) -> KernelTensors:
        swizzled = (*prepared_param_names("value"), *prepared_param_names("scale"))
        stored = (getattr(layer, name).data.mT for name in swizzled)
        return self.triton_tensors(*stored, layer.moeprep_w13_bias.data, layer.moeprep_w2_bias.data)

    def cached_kernel_tensors(self, layer: Any) -> KernelTensors:
        """vLLM keeps each Triton tensor's storage data as the parameter of vLLM's name."""
        names = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias")
        return self.triton_tensors(*(getattr(layer, name).data for name in names))

    def triton_tensors(self, *data: torch.Tensor) -> KernelTensors:
        """Triton tensors over the storage data of (w13, w2, w13 scale, w2 scale), with the biases."""
        check_bundled_triton_kernels()
        import triton_kernels.matmul_ogs_details.opt_flags as opt_flags
        from triton_kernels.tensor import FP4, Storage, Tensor
        from triton_kernels.tensor_details.layout import HopperMXScaleLayout, HopperMXValueLayout

        opt_flags.update_opt_flags_constraints({"split_k": 1})  # what vLLM's _swizzle_mxfp4 sets on sm90
        num_warps = int(self.knobs.get("num_warps", 8))

        def value(data: torch.Tensor, k: int, n: int) -> Tensor:
            """As ``convert_layout(wrap_torch_tensor(w.mT, FP4), HopperMXValueLayout)`` left it."""
            layout = HopperMXValueLayout([self.num_experts, k // 2, n], mx_axis=1)
            return Tensor(Storage(data, layout), dtype=FP4, shape=[self.num_experts, k, n])

        def scale(data: torch.Tensor, k: int, n: int) -> Tensor:
            groups = (k // 32 + 3) // 4 * 4  # vLLM pads scale groups to 0 mod 4 on sm90
            layout = HopperMXScaleLayout([self.num_experts, groups, n], mx_axis=1, num_warps=num_warps)
            return Tensor(Storage(data, layout), dtype=torch.uint8, shape=[self.num_experts, groups, n])

        w13, w2, w13_scale, w2_scale, w13_bias, w2_bias = data
        w13_rows, w2_rows = 2 * self.intermediate_size, self.hidden_size
        return (
            value(w13, self.hidden_size, w13_rows),
            value(w2, self.intermediate_size, w2_rows),
            scale(w13_scale, self.hidden_size, w13_rows),
            scale(w2_scale, self.intermediate_size, w2_rows),
            w13_bias,
            w2_bias,
        )

    def on_converted(self, layer: Any, tensors: KernelTensors) -> None:
        w13, w2, w13_scale, w2_scale, *_ = tensors
        keep_params_in_triton_tensors(
            layer, w13_weight=w13, w2_weight=w2, w13_weight_scale=w13_scale, w2_weight_scale=w2_scale
        )

    def conversion_result(self, tensors: KernelTensors) -> KernelTensors:
        w13, w2, w13_scale, w2_scale, w13_bias, w2_bias = tensors
        return w13, w2, triton_precision_config(w13_scale), triton_precision_config(w2_scale), w13_bias, w2_bias


class PreparedMarlinMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``MarlinExperts`` (bf16 activations): weights, scales and biases are plain tensors."""

    PARAMS = prepared_param_names("weight", "scale", "bias")
    BACKENDS = frozenset({"MARLIN", "BATCHED_MARLIN"})
    LAYOUT = "Marlin"
    supports_pre_processed_weights = True  # vLLM keeps the Marlin tensors as parameters of its own names

    def cached_kernel_tensors(self, layer: Any) -> KernelTensors:
        return tuple(getattr(layer, name).data for name in VLLM_ORDER)  # type: ignore[return-value]


class PreparedCpuMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``CPUExpertsMxfp4`` (vLLM CPU's AMX kernel): weights and scales packed for it, float32 biases."""

    PARAMS = prepared_param_names("weight", "scale", "bias")
    BACKENDS = frozenset({"CPU"})
    LAYOUT = "CPU AMX"

    def check_machine(self) -> None:
        from moeprep.runtime.cpu_mxfp4 import vllm_cpu_has_mxfp4_moe

        if torch.cuda.is_available() or not vllm_cpu_has_mxfp4_moe():
            raise PreparedCheckpointMismatch(
                "moeprep: this folder holds CPU AMX layouts, which need vLLM CPU on a CPU with AMX; on this machine "
                "convert with --backend auto, or serve the original checkpoint"
            )


class PaddedMxfp4MoEMethod(PreparedMxfp4MoEMethod):
    """``--backend none``: vLLM's mxfp4 parameters padded offline for the kernel vLLM picks on the folder's arch;
    vLLM's own kernel transform runs at load (a kernel with other padding is refused by the size check)."""

    PARAMS = prepared_param_names("weight", "scale", "bias")
    BACKENDS = frozenset()
    LAYOUT = "padded (untransformed) mxfp4"

    def process_weights_after_loading(self, layer: Any) -> None:
        self.params.check_all_loaded()
        for vllm_name, name in zip(VLLM_ORDER, PREPARED_ORDER, strict=True):
            layer.register_parameter(vllm_name, getattr(layer, name))
            delattr(layer, name)
        GptOssMxfp4MoEMethod.process_weights_after_loading(self, layer)
        self.tracker.layer_ready(self.prefix)


PREPARED_METHODS: dict[str, type[PreparedMxfp4MoEMethod]] = {
    "triton": PreparedTritonMxfp4MoEMethod,
    "marlin": PreparedMarlinMxfp4MoEMethod,
    "none": PaddedMxfp4MoEMethod,
    "cpu": PreparedCpuMxfp4MoEMethod,
}
