"""Source + target -> the list of tensor jobs a conversion runs (what ``--dry-run`` prints).

Each job names its output tensor (the vLLM parameter it fills, or the original name when the
tensor passes through), the source tensors it reads and the recipe that turns one into the other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from moeprep import rank_shards, shared_experts
from moeprep.auto_backend import AUTO, BackendChoice, choose_mxfp4, serving_target
from moeprep.checkpoint.safetensors_io import FLOAT_DTYPES, TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.errors import CheckpointError, UnsupportedModelError, option
from moeprep.families import Family, MoeSpec, family_for_config
from moeprep.families.base import EXPERT_FORMAT_NAMES
from moeprep.families.config_view import ConfigView, config_view
from moeprep.jobs import TensorJob, dim0_chunks, passthrough_job
from moeprep.layouts.backend import LAYOUT_BACKENDS, PADDING_ONLY, LayoutBackend
from moeprep.layouts.mxfp4_experts import (
    Mxfp4ExpertDims,
    Mxfp4Partition,
    PreparedExpertTensor,
    then,
)
from moeprep.layouts.padding import round_up
from moeprep.schema.manifest import PASSTHROUGH_RECIPE, QUANT_METHOD, Target
from moeprep.schema.names import decoder_mlp
from moeprep.schema.routing import FusedSharedExperts
from moeprep.schema.vllm_versions import target_version

PASSTHROUGH = PASSTHROUGH_RECIPE
VLLM_BIAS_DTYPE = "BF16"  # vLLM's gpt-oss mxfp4 methods hold the expert biases in bf16 parameters
PASSTHROUGH_VERIFIED_VLLM = ["0.26.0", "0.32.0", "0.34.0"]  # served in the tests; any vLLM serves pass-through folders
MXFP4_BACKENDS = {name: backend for name, backend in LAYOUT_BACKENDS.items() if name != PADDING_ONLY}
BACKENDS = (PADDING_ONLY, *MXFP4_BACKENDS)


def serve_flags(backend: str) -> list[str]:
    """The ``vllm serve`` flags a backend's folders need (the mxfp4 layouts name vLLM's kernel)."""
    return list(MXFP4_BACKENDS[backend].serve_flags) if backend in MXFP4_BACKENDS else []


@dataclass
class Plan:
    family: Family
    moe: MoeSpec
    target: Target
    jobs: list[TensorJob]
    unknown_tensors: list[str]
    fused_shared: FusedSharedExperts | None = None  # the routing contract of fused shared experts
    kept_dtypes: dict[str, str] = field(default_factory=dict)  # float tensors stored in another dtype, kept as such
    chosen_because: str | None = None  # why ``--backend auto`` chose this backend
    cast_dtypes: dict[str, str] = field(default_factory=dict)  # re-laid-out tensors cast as vLLM's loader casts them

    @property
    def total_bytes(self) -> int:
        return sum(job.entry.nbytes for job in self.jobs)

    def summary(self) -> dict[str, Any]:
        recipes: dict[str, int] = {}
        for job in self.jobs:
            recipes[job.recipe] = recipes.get(job.recipe, 0) + 1
        return {
            "family": self.family.name,
            "backend": self.target.backend,
            "tensors": len(self.jobs),
            "bytes": self.total_bytes,
            "recipes": recipes,
            "moe_layers": len(self.moe.moe_layers),
            "experts": self.moe.num_experts,
            "top_k": self.moe.top_k,
            "expert_format": self.moe.expert_format,
            "serve_flags": serve_flags(self.target.backend),
            "not_in_family_inventory": len(self.unknown_tensors),
            "kept_float_dtypes": dict(sorted(Counter(self.kept_dtypes.values()).items())),
            "cast_as_vllm_loads": dict(sorted(Counter(self.cast_dtypes.values()).items())),
            "fused_shared_experts": self.fused_shared.to_json() if self.fused_shared else None,
        }


@dataclass(frozen=True)
class Inventory:
    """What ``check_inventory`` found: tensors beyond the family's inventory, and float tensors stored in another
    float dtype than the family's usual one (vLLM casts those on load; moeprep keeps them as stored)."""

    unknown: list[str]
    other_float_dtype: dict[str, tuple[str, str]]  # name -> (stored dtype, the family's usual one)


def planned_config(source: CheckpointSource, family: Family) -> ConfigView:
    """config.json as the plan reads it: as the family finds it stored (``Family.as_stored``)."""
    return family.as_stored(config_view(source.config), source.tensor_names)


def check_inventory(source: CheckpointSource, family: Family) -> Inventory:
    """Every tensor the family expects is present with its shape, and its dtype where the bytes matter: float
    tensors may be stored in any float dtype (gpt-oss's float32 ``sinks``, a bf16 ``e_score_correction_bias``),
    quantized ones (mxfp4 blocks and scales, fp8 weights and their scales) only in the format's own."""
    expected = family.checkpoint_specs(planned_config(source, family))
    present = set(source.tensor_names)
    missing = [name for name in expected if name not in present]
    if missing:
        raise CheckpointError(
            f"{source.location}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) for a "
            f"{family.name} model with this config.json; the checkpoint is incomplete or config.json does not match it"
        )
    other_float = {}
    for name, spec in expected.items():
        dtype, shape = source.tensor_meta(name)
        if shape == spec.shape and dtype != spec.dtype and {dtype, spec.dtype} <= set(FLOAT_DTYPES):
            other_float[name] = (dtype, spec.dtype)
        elif shape != spec.shape or dtype != spec.dtype:
            raise CheckpointError(
                f"{source.location}: tensor {name!r} is {dtype}{list(shape)}, config.json implies "
                f"{spec.dtype}{list(spec.shape)}; the checkpoint does not match its config"
            )
    return Inventory(sorted(present - set(expected)), other_float)


def check_transformed_dtypes(source: CheckpointSource, inventory: Inventory, consumed: set[str]) -> None:
    """A tensor in another float dtype is served as stored; one that a layout transforms must have the usual one."""
    for name in sorted(consumed & set(inventory.other_float_dtype)):
        stored, usual = inventory.other_float_dtype[name]
        raise CheckpointError(
            f"{source.location}: tensor {name!r} is {stored}; this conversion re-lays it out and reads it as {usual} "
            f"only: store it as {usual} (vLLM loads it as {usual} too)"
        )


def _on_device(recipe: PreparedExpertTensor, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run ``recipe.transform`` on ``device``; the result stays there until the writer copies it into its
    buffers. Off the CPU, the source rows (a map of the file) are let go once copied."""

    def run(rows: torch.Tensor) -> torch.Tensor:
        moved = rows.to(device, non_blocking=True)
        del rows
        return recipe.transform(moved)

    return run


def _mxfp4_jobs(
    source: CheckpointSource,
    moe: MoeSpec,
    backend: LayoutBackend,
    arch: str,
    padding: dict[str, int],
    device: torch.device,
    tp_size: int = 1,
    ep_size: int = 1,
) -> tuple[list[TensorJob], set[str]]:
    """The backend's prepared tensors of every MoE layer; with ``tp_size`` > 1, every rank's own, cut and padded
    per partition as vLLM loads them (``Mxfp4Partition``); with ``ep_size`` > 1, every rank's whole experts as
    vLLM's linear placement gives them (``E // N`` each, the first ``E % N`` one more)."""
    hidden, inter = source.config["hidden_size"], moe.expert_intermediate
    hidden_multiple, inter_multiple = padding["hidden"], padding["intermediate"]
    if ep_size > 1:
        whole = Mxfp4Partition.of(inter, 1)[0]
        placement = partial(rank_shards.linear_placement, moe.num_experts, ep_size)
        shares = [(rank, whole, placement(rank)) for rank in range(ep_size)]
    else:
        every = range(moe.num_experts)
        shares = [(part.rank if tp_size > 1 else None, part, every) for part in Mxfp4Partition.of(inter, tp_size)]
    tp_share = 1 if ep_size > 1 else tp_size  # under expert parallelism vLLM does not split the experts
    jobs, consumed, cast = [], set(), {}
    for rank, part, experts in shares:
        dims = Mxfp4ExpertDims(
            len(experts),
            hidden,
            part.end - part.start,
            round_up(hidden, hidden_multiple),
            round_up(inter // tp_share, inter_multiple),
        )
        if not 0 < dims.intermediate <= dims.intermediate_padded:
            raise UnsupportedModelError(
                f"{option('tp_size', tp_size)}: rank {part.rank} would get {dims.intermediate} of the experts' "
                f"{inter} intermediate columns, and vLLM's per-partition parameters hold {dims.intermediate_padded} "
                f"with {backend.name} padding; use another {option('tp_size')}"
            )
        for layer in moe.moe_layers:
            source_prefix = f"{decoder_mlp(layer)}.experts"
            param_prefix = f"model.layers.{layer}.{backend.experts_module}"
            for recipe in backend.prepared_expert_tensors(dims, arch):
                src = f"{source_prefix}.{recipe.source}"
                entry = TensorEntry(f"{param_prefix}.{recipe.param}", recipe.dtype, recipe.storage_shape)
                transform = _on_device(recipe, device)
                name = recipe.recipe
                if recipe.source.endswith("_bias") and (stored := source.tensor_meta(src)[0]) != VLLM_BIAS_DTYPE:
                    transform = then(as_vllm_bias, transform)
                    cast[src] = f"{stored}->{VLLM_BIAS_DTYPE}"
                    name = f"{name}+cast-{stored}-{VLLM_BIAS_DTYPE}".lower()  # the manifest's record says so
                if ep_size > 1:
                    name = f"{name}+{rank_shards.RECIPE_EP}"
                elif rank is not None:
                    transform = then(partial(part.cut, recipe.source), transform)
                    name = f"{name}+{rank_shards.RECIPE_TP}"
                run = partial(dim0_chunks, name=src, transform=transform, rows=experts)
                jobs.append(TensorJob(entry, (src,), name, run, recipe.view_shape, recipe.view_strides, rank))
                consumed.add(src)
    return jobs, consumed, cast


def as_vllm_bias(bias: torch.Tensor) -> torch.Tensor:
    """An expert bias as vLLM's loader leaves it: copied into its bf16 parameter (round to nearest even)."""
    return bias.to(torch.bfloat16)


def transform_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UnsupportedModelError(f"{option('device', device)} is not a torch device (use cpu or cuda)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError(
            f"{option('device', 'cuda')} was given but no CUDA GPU is available; use {option('device', 'cpu')}"
        )
    return resolved


def mxfp4_layout(backend: str, expert_format: str) -> LayoutBackend | None:
    """The layout backend writing mxfp4 experts for ``backend`` (``none``: padding only), None for other experts."""
    return LAYOUT_BACKENDS[backend] if expert_format == "mxfp4" else None


def backend_target(
    backend: str, arch: str | None, layout: LayoutBackend | None = None, vllm_version: str | None = None
) -> Target:
    """The manifest target of ``backend``; ``layout`` lays out the mxfp4 experts (None: tensors pass through);
    ``vllm_version``: the vLLM to prepare for (None: the installed one for the backend's platform, else the newest)."""
    if layout is None:
        return Target(backend, PASSTHROUGH, 1, list(PASSTHROUGH_VERIFIED_VLLM))
    arch = arch or layout.arches[0]
    if arch not in layout.arches:
        raise UnsupportedModelError(
            f"backend {backend} supports {option('arch')} {', '.join(layout.arches)}, not {arch!r}"
        )
    version = target_version(layout.platform, vllm_version)
    ranges, padding = layout.recipe_span(arch, version)
    return Target(
        backend=backend,
        recipe=f"{backend}-{arch}",
        recipe_version=layout.recipe_version,
        vllm_versions=sorted({v for span in ranges for v in span}),
        padding=dict(zip(("hidden", "intermediate"), padding, strict=True)),
        knobs={"arch": arch, **layout.knobs},
        vllm_ranges=ranges,
    )


def _rank_shard_jobs(source: CheckpointSource, moe: MoeSpec, options: PlanOptions) -> tuple[list[TensorJob], set[str]]:
    """Per-rank files of experts that pass through (mxfp4 layouts are cut per rank by ``_mxfp4_jobs``)."""
    return rank_shards.rank_jobs(source, moe, options.tp_size, options.ep_size)


def _fused_shared_jobs(
    source: CheckpointSource, family: Family, moe: MoeSpec, replicas: int, requantize: bool
) -> tuple[list[TensorJob], set[str], FusedSharedExperts]:
    shared_experts.check_fusable(family, moe, replicas)
    jobs, consumed, requantized = shared_experts.slot_jobs(source, family, moe, replicas, requantize)
    contract = shared_experts.routing_contract(family, moe, planned_config(source, family), replicas, requantized)
    return jobs, consumed, contract


@dataclass(frozen=True)
class PlanOptions:
    """How to prepare a checkpoint besides its backend: ``arch`` of the mxfp4 layouts, ``device`` they run on;
    ``fuse_shared_replicas`` > 0 clones the shared experts into that many replicas of routed-expert slots,
    ``requantize_shared`` lets those slots change format to the routed experts' one; ``tp_size`` or
    ``ep_size`` > 1 writes each rank's expert shards (TP slices, or whole experts under EP) into its own files;
    ``vllm_version``: the vLLM the layouts are for (None: ``vllm_versions.target_version``)."""

    arch: str | None = None
    device: str = "cpu"
    fuse_shared_replicas: int = 0
    requantize_shared: bool = False
    tp_size: int = 1
    ep_size: int = 1
    vllm_version: str | None = None
    target_gpu: str | None = None  # with backend auto: the GPU the folder will be served on (h100, b200, ...)


def auto_choice(expert_format: str, options: PlanOptions) -> BackendChoice:
    """``--backend auto``: the backend vLLM's own selection leads to on the serving target."""
    if expert_format != "mxfp4":
        return BackendChoice(
            "none", options.arch, f"{EXPERT_FORMAT_NAMES[expert_format]} are loaded by vLLM as stored, on any target"
        )
    target = serving_target(options.arch, options.target_gpu)
    try:
        trtllm = LAYOUT_BACKENDS["flashinfer-trtllm"]
        trtllm.recipe_span("sm100", target_version(trtllm.platform, options.vllm_version))
        trtllm_supported = True
    except UnsupportedModelError:
        trtllm_supported = False
    return choose_mxfp4(target, trtllm_supported)


def build_plan(source: CheckpointSource, backend: str = "none", options: PlanOptions = PlanOptions()) -> Plan:
    """Validate the source against its family and list the jobs for ``backend`` with ``options``."""
    if backend not in (AUTO, *BACKENDS):
        choices = ", ".join((AUTO, *BACKENDS))
        raise UnsupportedModelError(f"backend {backend!r} is not available; choose one of: {choices}")
    original_quant = source.config.get("quantization_config")
    if isinstance(original_quant, dict) and original_quant.get("quant_method") == QUANT_METHOD:
        raise UnsupportedModelError(
            f"{source.location} was already prepared by moeprep; convert the original checkpoint instead"
        )
    family = family_for_config(source.config)
    inventory = check_inventory(source, family)
    moe = family.moe_spec(planned_config(source, family))
    choice = None
    if backend == AUTO:
        choice = auto_choice(moe.expert_format, options)
        backend, options = choice.backend, replace(options, arch=choice.arch)
    if backend in MXFP4_BACKENDS and moe.expert_format != "mxfp4":
        raise UnsupportedModelError(
            f"backend {backend} lays out mxfp4 experts; this {family.name} model has {moe.format_name}, "
            f"use {option('backend', 'none')}"
        )
    layout = mxfp4_layout(backend, moe.expert_format)
    target = backend_target(backend, options.arch, layout, options.vllm_version)
    target = replace(target, tp_size=options.tp_size, ep_size=options.ep_size)
    jobs: list[TensorJob] = []
    consumed: set[str] = set()
    cast: dict[str, str] = {}
    if options.ep_size > 1 and options.ep_size % options.tp_size:
        raise UnsupportedModelError(
            f"{option('ep_size', options.ep_size)} with {option('tp_size', options.tp_size)}: vLLM's expert-parallel "
            "group is TP x DP ranks, "
            "a multiple of the TP size"
        )
    if options.ep_size > moe.num_experts:
        raise UnsupportedModelError(
            f"{option('ep_size', options.ep_size)}: the model has only {moe.num_experts} experts"
        )
    if layout is not None:
        device = transform_device(options.device)
        jobs, consumed, cast = _mxfp4_jobs(
            source, moe, layout, target.knobs["arch"], target.padding, device, options.tp_size, options.ep_size
        )
    elif options.tp_size > 1 or options.ep_size > 1:
        jobs, consumed = _rank_shard_jobs(source, moe, options)
    contract = None
    fused: list[TensorJob] = []
    if options.fuse_shared_replicas:
        fused, fused_consumed, contract = _fused_shared_jobs(
            source, family, moe, options.fuse_shared_replicas, options.requantize_shared
        )
        consumed |= fused_consumed
        if options.ep_size > 1:
            placement = rank_shards.SpreadSlotPlacement.checked(
                moe.num_experts, contract.slots, options.fuse_shared_replicas, options.ep_size
            )
            jobs, fused = [placement.place(job) for job in jobs], [placement.place(job) for job in fused]
            contract = placement.spread(contract)
        elif options.tp_size > 1:
            fused = [rank_job for job in fused for rank_job in rank_shards.tensor_parallel_slices(job, options.tp_size)]
    check_transformed_dtypes(source, inventory, consumed - set(cast))
    jobs += [passthrough_job(source, name) for name in source.tensor_names if name not in consumed]
    kept = {name: stored for name, (stored, _) in inventory.other_float_dtype.items() if name not in cast}
    reason = choice.reason if choice else None
    return Plan(family, moe, target, jobs + fused, inventory.unknown, contract, kept, reason, cast)
