"""The private vLLM internals the plugin relies on, in one place, chosen by what the installed vLLM offers
(functions, signatures, attributes), never by its version string.

The prepared mxfp4 methods let vLLM's own ``GptOssMxfp4MoEMethod._setup_kernel`` run (parameter
bookkeeping, quant config, kernel construction and the kernel's own post-load step, all as the running vLLM
does them) with one step replaced: its weight conversion (``convert_gpt_oss_weight_to_mxfp4_moe_kernel_format``)
returns the prepared tensors instead of transforming loaded ones. ``missing_hooks`` names what a vLLM lacks.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from moeprep.errors import PreparedCheckpointMismatch

MXFP4_METHOD_MODULE = "vllm.model_executor.layers.quantization.mxfp4"
MXFP4_ORACLE_MODULE = "vllm.model_executor.layers.fused_moe.oracle.mxfp4"
LORA_MOE_METHOD_MODULE = "vllm.model_executor.layers.fused_moe.fused_moe_modular_method"
CONVERSION = "convert_gpt_oss_weight_to_mxfp4_moe_kernel_format"
SETUP_KERNEL_ARGS = ("layer", "w13", "w2", "w13_scale", "w2_scale", "w13_bias", "w2_bias")
BUNDLED_TRITON_KERNELS = Path("vllm", "third_party", "triton_kernels")

# (w13, w2, w13 scale, w2 scale, w13 bias, w2 bias) in the objects vLLM's conversion returns for a backend
KernelTensors = tuple[Any, Any, Any, Any, torch.Tensor, torch.Tensor]


def missing_hooks() -> list[str]:
    """The private vLLM names the prepared mxfp4 methods use that the installed vLLM lacks (empty: all there)."""
    module = importlib.import_module(MXFP4_METHOD_MODULE)
    missing = [] if hasattr(module, CONVERSION) else [f"{MXFP4_METHOD_MODULE}.{CONVERSION}"]
    setup = getattr(getattr(module, "GptOssMxfp4MoEMethod", None), "_setup_kernel", None)
    if setup is None or tuple(inspect.signature(setup).parameters)[1:] != SETUP_KERNEL_ARGS:
        missing.append(f"GptOssMxfp4MoEMethod._setup_kernel{SETUP_KERNEL_ARGS}")
    return missing


def check_hooks() -> None:
    if missing := missing_hooks():
        raise PreparedCheckpointMismatch(
            f"moeprep: this vLLM lacks {missing[0]}, which serving prepared mxfp4 layouts uses; install a vLLM "
            "in the folder's verified range (moeprep inspect shows it) or serve the original checkpoint"
        )


@contextmanager
def replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    """``module.name = value`` for the duration of the block."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def conversion_replaced(convert: Callable[..., KernelTensors]) -> AbstractContextManager[None]:
    """Within the block, vLLM's gpt-oss mxfp4 method converts its weights with ``convert`` (same keyword
    arguments as vLLM's conversion)."""
    return replaced(importlib.import_module(MXFP4_METHOD_MODULE), CONVERSION, convert)


def setup_prepared_kernel(method: Any, layer: Any, tensors: KernelTensors, on_converted: Callable[[], None]) -> None:
    """Run vLLM's ``_setup_kernel`` of ``method`` with ``tensors`` as its conversion's result; ``on_converted``
    runs where the conversion would (for the side effects vLLM's conversion has on the layer)."""
    check_hooks()
    experts, inter, hidden = method.num_experts, method.intermediate_size, method.hidden_size
    w13_rows = tensors[4].shape[1]  # the bias: [E, shards x intermediate]

    def placeholder(*shape: int) -> torch.Tensor:
        """vLLM checks the loaded tensors' shapes before converting them; the prepared ones are already converted."""
        return torch.empty(shape, dtype=torch.uint8, device="meta")

    def convert(**_: Any) -> KernelTensors:
        on_converted()
        return tensors

    from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4MoEMethod

    with conversion_replaced(convert):
        GptOssMxfp4MoEMethod._setup_kernel(
            method,
            layer,
            placeholder(experts, w13_rows, hidden // 2),
            placeholder(experts, hidden, inter // 2),
            placeholder(experts, w13_rows, hidden // 32),
            placeholder(experts, hidden, inter // 32),
            tensors[4],
            tensors[5],
        )


def check_bundled_triton_kernels() -> None:
    """Import ``triton_kernels`` as vLLM does; refuse one that is not the copy bundled with vLLM, whose layout
    API and bytes moeprep's triton layouts were made for."""
    from vllm.utils.import_utils import import_triton_kernels

    import_triton_kernels()
    module = importlib.import_module("triton_kernels")
    where = Path(module.__file__ or "").parent
    if where.parts[-3:] != BUNDLED_TRITON_KERNELS.parts:
        raise PreparedCheckpointMismatch(
            f"moeprep: vLLM uses triton_kernels from {where}, not the copy bundled with vLLM that this folder's "
            "triton layout was made for; uninstall that package (pip uninstall triton_kernels) or convert with "
            "--backend marlin"
        )


def triton_precision_config(scale: Any) -> Any:
    """The ``PrecisionConfig`` vLLM's conversion builds around a swizzled mxfp4 weight scale."""
    from triton_kernels.numerics import InFlexData

    api = "triton_kernels.matmul_ogs"
    if importlib.util.find_spec(api) is None:
        api = "triton_kernels.matmul"
    module = importlib.import_module(api)
    utils = importlib.import_module("vllm.model_executor.layers.quantization.utils.mxfp4_utils")
    kwargs = utils.mx_scale_kwargs(scale) if hasattr(utils, "mx_scale_kwargs") else {"weight_scale": scale}
    return module.PrecisionConfig(**kwargs, flex_ctx=module.FlexCtx(rhs_data=InFlexData()))


def weights_pre_processed() -> bool:
    """Whether vLLM is re-running post-processing on tensors that already went through it: its weight cache
    (``vllm preload`` + ``--load-format ipc_cache``, vLLM 0.30+) hands over the post-processed tensors, and
    methods must then only rebuild their kernels. False on vLLMs without that mode."""
    utils = importlib.import_module("vllm.model_executor.utils")
    check = getattr(utils, "is_weights_pre_processed", None)
    return bool(check is not None and check())


def triton_params_kept() -> bool:
    """Whether vLLM keeps each swizzled Triton tensor's storage as a layer parameter (vLLM 0.34+), so that the
    weight cache can hand the post-processed Triton tensors over."""
    return hasattr(importlib.import_module(MXFP4_ORACLE_MODULE), "store_params_in_triton")


def lora_hands_triton_kernels_raw_weights() -> bool:
    """Whether vLLM's MoE LoRA wrapper (``FusedMoEModularMethod.apply``) would hand the unfused Triton kernel the
    layer's weight parameter, which holds only the raw storage where vLLM keeps Triton tensors beside it (vLLM
    0.34), instead of the Triton tensor (its own mxfp4 method reads ``triton_weight``). Seen failing on an H200
    with vLLM 0.34, for vLLM's own gpt-oss too."""
    if not triton_params_kept():
        return False
    method = getattr(importlib.import_module(LORA_MOE_METHOD_MODULE), "FusedMoEModularMethod", None)
    return method is not None and "triton_weight" not in inspect.getsource(method.apply)


def keep_params_in_triton_tensors(layer: Any, **tensors: Any) -> None:
    """Where vLLM's conversion keeps each swizzled tensor's storage as the layer's parameter of that name (its
    ``store_params_in_triton``), do the same; older vLLMs drop those parameters instead."""
    if triton_params_kept():
        importlib.import_module(MXFP4_ORACLE_MODULE).store_params_in_triton(layer, **tensors)
