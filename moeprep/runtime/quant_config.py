"""The ``moeprep`` quantization method: loads prepared folders and refuses mismatched ones.

A prepared config.json says ``quantization_config = {"quant_method": "moeprep", "backend": ...,
"original": <the source's quantization_config or null>}``. Layers whose tensors passed through
are delegated to the original method (or left unquantized); the manifest is checked against the
running vLLM before the first layer is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import get_quantization_config, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.platforms import current_platform

from moeprep.errors import MoeprepError, PreparedCheckpointMismatch
from moeprep.runtime.lora_check import serve_base
from moeprep.runtime.slot_steps import check_slots_to_choose
from moeprep.runtime.tracking import PreparedTensorTracker
from moeprep.schema.manifest import (
    MANIFEST_NAME,
    QUANT_METHOD,
    SCHEMA_VERSION,
    SEAL_NAME,
    Manifest,
    TensorRecord,
    check_file_sizes,
    load_manifest,
)
from moeprep.schema.names import is_prepared_param
from moeprep.schema.routing import FusedSharedExperts
from moeprep.schema.serving import CPU_BACKENDS, backend_not_served, unserved_reason
from moeprep.schema.vllm_versions import in_ranges, served_vllm

RUNTIME_BACKENDS = ("none", "triton", "marlin", "dequant", "cpu")
STRICT_VLLM_ENV = "MOEPREP_STRICT_VLLM"  # 1: refuse folders outside their vLLM ranges without the layout check
# Attributes vLLM reads off the model's quantization config by name (block-fp8 linear splits, the CUDA fp8
# quant op and its norm/activation fusions, kv-cache scales): a prepared folder gets the original's.
MIRRORED_ATTRIBUTES = ("weight_block_size", "kv_cache_scheme")
FUSED_ARCH_PREFIX = "MoeprepFused"  # the runtime's architectures for folders with fused shared experts
logger = init_logger("vllm.moeprep")  # under vLLM's logger, so its handlers print it


def running_vllm_version() -> str:
    return str(vllm.__version__).split("+")[0]


def prepared_folder(model: str, revision: str | None) -> Path:
    """The local folder of the model vLLM is loading (a path, or a Hub repo's snapshot)."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import hf_hub_download

    hf_hub_download(model, SEAL_NAME, revision=revision)
    return Path(hf_hub_download(model, MANIFEST_NAME, revision=revision)).parent


def running_ep_size(parallel_config: Any) -> int:
    """vLLM's expert-parallel group spans TP x DP ranks when expert parallelism is on, else 1."""
    if not parallel_config.enable_expert_parallel:
        return 1
    return parallel_config.tensor_parallel_size * parallel_config.data_parallel_size


def check_manifest_against_runtime(manifest: Manifest, backend: str, tp_size: int, ep_size: int = 1) -> None:
    version = running_vllm_version()
    target = manifest.target
    if target.backend != backend:
        raise PreparedCheckpointMismatch(
            f"moeprep: config.json says backend {backend!r} but {MANIFEST_NAME} says {target.backend!r}; convert again"
        )
    if target.locked_to_vllm and not in_ranges(version, target.served_vllm_ranges):
        prove_layout_on_running_vllm(manifest, version)
    if target.tp_size != 1 and target.tp_size != tp_size:
        raise PreparedCheckpointMismatch(
            f"moeprep: prepared for tensor parallel size {target.tp_size}, running with {tp_size}; "
            f"serve with --tensor-parallel-size {target.tp_size} or convert again with --tp {tp_size}"
        )
    if target.ep_size != 1 and target.ep_size != ep_size:
        raise PreparedCheckpointMismatch(
            f"moeprep: prepared for expert parallel size {target.ep_size}, running with {ep_size}; serve with "
            f"--enable-expert-parallel over {target.ep_size} ranks (TP x DP) or convert again with --ep {ep_size}"
        )


def prove_layout_on_running_vllm(manifest: Manifest, version: str) -> None:
    """A folder outside its verified vLLM ranges is served only if the running vLLM's own transform of a random
    layer equals the folder's layout bitwise (``layout_check``); ``MOEPREP_STRICT_VLLM=1`` refuses it outright."""
    target = manifest.target
    outside = (
        f"moeprep: this folder's layouts are verified for vLLM {served_vllm(target)} but vLLM {version} is running"
    )
    fix = "install one of those or re-run moeprep convert with this vLLM"
    if os.environ.get(STRICT_VLLM_ENV) == "1":
        raise PreparedCheckpointMismatch(f"{outside}; {fix} ({STRICT_VLLM_ENV}=1: no load-time layout check)")
    from moeprep.layout_check import CannotCheck, check_layout

    try:
        check = check_layout(target.backend, str(target.knobs.get("arch", "any")))
    except CannotCheck as exc:
        raise PreparedCheckpointMismatch(f"{outside} and cannot prove the layout here ({exc}); {fix}") from None
    if check.first_mismatch:
        raise PreparedCheckpointMismatch(
            f"{outside} and makes {check.first_mismatch} differently (random layer, seed {check.seed}); {fix}"
        )
    logger.warning(
        "moeprep: vLLM %s is outside this folder's verified ranges (%s); its own transform of a random layer "
        "(seed %d) equals the folder's layout in all %d tensors, so it is served",
        version,
        served_vllm(target),
        check.seed,
        len(check.equal),
    )


def check_architecture(manifest: Manifest, architectures: list[str]) -> None:
    """A folder with fused shared-expert slots is served only by the architecture that routes to them, and
    that architecture only serves such folders."""
    contract = manifest.fused_shared
    fused_names = [name for name in architectures if name.startswith(FUSED_ARCH_PREFIX)]
    if (contract is None and fused_names) or (contract is not None and architectures != [contract.architecture]):
        expected = [contract.architecture] if contract else manifest.architectures
        raise PreparedCheckpointMismatch(
            f"moeprep: config.json names architectures {architectures} but {MANIFEST_NAME} was written for "
            f"{expected}; restore config.json or convert again"
        )


def check_rank_tensors(manifest: Manifest, expert_parallel: bool, on_cpu: bool) -> None:
    """A folder with per-rank expert files is one this runtime serves, in the parallelism it was written for."""
    rank_tensors = manifest.rank_tensors[0] if manifest.rank_tensors else ()
    if reason := unserved_reason(manifest.target, rank_tensors, on_cpu):
        raise PreparedCheckpointMismatch(f"moeprep: {reason}")
    if manifest.rank_tensors and expert_parallel and manifest.target.ep_size == 1:
        raise PreparedCheckpointMismatch(
            "moeprep: this folder holds tensor-parallel expert shards (convert --tp); serve it without "
            "--enable-expert-parallel, or convert with --ep"
        )


@register_quantization_config(QUANT_METHOD)
class MoeprepConfig(QuantizationConfig):
    """Quantization config for folders written by ``moeprep convert``."""

    def __init__(self, backend: str, original: dict[str, Any] | None) -> None:
        super().__init__()
        self.backend = backend
        self.original_config = original
        self.original: QuantizationConfig | None = None
        if original is not None:
            self.original = get_quantization_config(original["quant_method"]).from_config(original)
            for name in MIRRORED_ATTRIBUTES:
                if hasattr(self.original, name):
                    setattr(self, name, getattr(self.original, name))
        self.manifest: Manifest | None = None
        self.folder = Path()
        self.tracker = PreparedTensorTracker(set())

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        if self.original is not None and self.backend != "dequant":  # dequant computes in float32, returns any
            return self.original.get_supported_act_dtypes()
        return [torch.bfloat16, torch.float16, torch.float32]

    def has_blocked_weights(self) -> bool:
        """Whether the original method's weights are block-scaled (asked when it has no ``weight_block_size``)."""
        has_blocked_weights = getattr(self.original, "has_blocked_weights", None)
        return bool(has_blocked_weights()) if has_blocked_weights is not None else False

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoeprepConfig:
        if config.get("schema_version") != SCHEMA_VERSION:
            raise PreparedCheckpointMismatch(
                f"moeprep: prepared with schema {config.get('schema_version')!r}, this runtime reads {SCHEMA_VERSION}; "
                "install the moeprep version that wrote it or convert again"
            )
        backend = config.get("backend")
        if reason := backend_not_served(str(backend)):
            raise PreparedCheckpointMismatch(f"moeprep: {reason}")
        if backend not in RUNTIME_BACKENDS:
            raise PreparedCheckpointMismatch(
                f"moeprep: backend {backend!r} is not supported by this moeprep runtime "
                f"(supports {', '.join(RUNTIME_BACKENDS)}); upgrade moeprep"
            )
        return cls(backend, config.get("original"))

    def _load_and_check_manifest(self) -> None:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        model_config = vllm_config.model_config
        folder = prepared_folder(model_config.model, model_config.revision)
        try:
            manifest = load_manifest(folder)
            check_file_sizes(folder, manifest)
        except MoeprepError as exc:
            raise PreparedCheckpointMismatch(f"moeprep: {exc}") from exc
        parallel = vllm_config.parallel_config
        check_manifest_against_runtime(manifest, self.backend, parallel.tensor_parallel_size, running_ep_size(parallel))
        check_architecture(manifest, list(model_config.architectures or []))
        check_slots_to_choose(manifest.fused_shared)
        check_rank_tensors(manifest, parallel.enable_expert_parallel, current_platform.is_cpu())
        self.manifest, self.folder = manifest, folder
        serve_base(folder)
        prepared = {name for name in manifest.tensors if is_prepared_param(name)}
        self.tracker = PreparedTensorTracker(prepared | set(self.rank_records()))

    def rank_records(self) -> dict[str, TensorRecord]:
        """This rank's own expert tensors: its tensor-parallel rank's (``--tp``) or its expert-parallel rank's
        (``--ep``); none for a single-partition folder."""
        assert self.manifest is not None
        if not self.manifest.rank_tensors:
            return {}
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.distributed.parallel_state import get_ep_group

        ep = self.manifest.target.ep_size > 1
        return self.manifest.rank_tensors[get_ep_group().rank_in_group if ep else get_tensor_model_parallel_rank()]

    def fused_shared_contract(self) -> FusedSharedExperts:
        """The manifest's fused-shared-expert routing contract (the manifest is read on first use)."""
        if self.manifest is None:
            self._load_and_check_manifest()
        assert self.manifest is not None
        contract = self.manifest.fused_shared
        if contract is None:
            raise PreparedCheckpointMismatch(f"moeprep: {MANIFEST_NAME} has no fused shared experts; convert again")
        return contract

    def prepared_records(self, prefix: str, records: dict[str, TensorRecord] | None = None) -> dict[str, TensorRecord]:
        """Manifest records (by full tensor name) of the prepared parameters of the experts module at ``prefix``,
        among ``records`` (default: the replicated tensors)."""
        assert self.manifest is not None
        layer = prefix.removesuffix(".routed_experts")
        modules = {layer, f"{layer}.routed_experts"}
        return {
            name: record
            for name, record in (self.manifest.tensors if records is None else records).items()
            if name.rpartition(".")[0] in modules and is_prepared_param(name)
        }

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if self.manifest is None:
            self._load_and_check_manifest()
        rank_records = self.rank_records()
        if rank_records and isinstance(layer, RoutedExperts) and self.backend not in CPU_BACKENDS:
            from moeprep.runtime.rank_experts import RankExpertsMoEMethod

            experts = prefix.removesuffix(".routed_experts") + "."
            records = {n: r for n, r in rank_records.items() if n.startswith(experts)}
            self.tracker.layer_built(prefix)
            return RankExpertsMoEMethod(layer.moe_config, self.folder, prefix, records, self.tracker)
        if isinstance(layer, RoutedExperts) and (self.backend != "none" or self.prepared_records(prefix)):
            self.tracker.layer_built(prefix)
            records = self.prepared_records(prefix, rank_records or None)
            folder = self.folder if rank_records else None  # CPU layouts read --tp rank files themselves
            if self.backend == "dequant":
                from moeprep.runtime.cpu_mxfp4 import DequantMxfp4MoEMethod

                return DequantMxfp4MoEMethod(layer.moe_config, prefix, records, self.tracker, folder)
            from moeprep.runtime.mxfp4 import PREPARED_METHODS

            assert self.manifest is not None
            return PREPARED_METHODS[self.backend](
                layer.moe_config, prefix, records, self.manifest.target.knobs, self.tracker, folder
            )
        if self.original is not None:
            self.original.packed_modules_mapping = self.packed_modules_mapping
            return self.original.get_quant_method(layer, prefix)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        if self.original is not None:
            self.original.apply_vllm_mapper(hf_to_vllm_mapper)
