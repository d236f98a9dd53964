"""Fused shared experts: clone each layer's shared expert into extra routed-expert slots.

A shared expert with intermediate size ``S_I`` becomes ``slots = ceil(S_I / I)`` experts of the routed
intermediate size ``I`` (a SwiGLU MLP is a sum over its intermediate rows, so chunks of gate/up rows and
the matching down columns add up to the whole; a last chunk narrower than ``I`` is padded with zeros,
which contribute exactly nothing). Each slot is written ``replicas`` times, after the routed experts:
slot ``s`` replica ``r`` is expert ``E + s * replicas + r``. The routing contract recorded in the manifest
tells the runtime how to route to them: every token takes every slot (replica ``token % replicas``) at the
slot weight, after the routed top-k was chosen and renormalised. Where the routing weight scales the
expert's input (Llama 4), the slots run on extra copies of each token's row instead, so that the routed
expert's input is scaled and the shared expert's is not (``router_weight_on_input`` in the contract).
Experts stored as 3-D tensors (Llama 4) get the slots appended to those tensors, in their layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from moeprep.checkpoint.safetensors_io import DTYPES, FLOAT_DTYPES, TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.errors import UnsupportedModelError, option
from moeprep.families import Family, MoeSpec, fp8_block
from moeprep.jobs import TensorJob, dim0_chunks, padded_chunk, read_chunk
from moeprep.schema.names import PROJECTIONS, decoder_mlp, expert_tensor_name
from moeprep.schema.routing import FusedSharedExperts

FUSE, REQUANTIZE = option("fuse_shared_replicas"), option("requantize_shared")  # as messages name them
RECIPE_SLOT = "shared-expert-slot"
RECIPE_REQUANTIZED = "shared-expert-slot-requantized"
RECIPE_ROUTER = "router+shared-expert-gate"
RECIPE_3D_SLOTS = "experts-3d+shared-expert-slots"
TensorMetas = dict[str, tuple[str, tuple[int, ...]]]  # {name suffix: (dtype, shape)}


def slot_count(shared_intermediate: int, expert_intermediate: int) -> int:
    return math.ceil(shared_intermediate / expert_intermediate)


def _tensors_under(source: CheckpointSource, prefix: str) -> TensorMetas:
    """``{suffix: (dtype, shape)}`` of the tensors named ``prefix.<suffix>``."""
    return {
        name[len(prefix) + 1 :]: source.tensor_meta(name)
        for name in source.tensor_names
        if name.startswith(prefix + ".")
    }


def routing_contract(
    family: Family, moe: MoeSpec, config: dict[str, Any], replicas: int, requantized: str | None = None
) -> FusedSharedExperts:
    """The manifest's ``routing.fused_shared_experts``: how the runtime routes to the slots (``requantized``:
    the slots' format change, when the shared expert was stored in another format than the routed ones)."""
    first_mtp, mtp_count = config.get("num_hidden_layers") or 0, config.get("num_nextn_predict_layers") or 0
    return FusedSharedExperts.of(
        routed_experts=moe.num_experts,
        slots=slot_count(moe.shared_intermediate, moe.expert_intermediate),
        replicas=replicas,
        top_k=moe.top_k,
        expert_intermediate=moe.expert_intermediate,
        gated=bool(family.shared_expert_gate_module),
        routed_scaling_factor=moe.routed_scaling_factor,
        renormalize=moe.renormalize,
        router_weight_on_input=family.router_weight_on_input,
        shared_intermediate=moe.shared_intermediate,
        architecture=family.fused_shared_architecture,
        original_architectures=tuple(config.get("architectures") or []),
        slots_requantized=requantized,
        mtp_layers=tuple(range(first_mtp, first_mtp + mtp_count)),
    )


def check_fusable(family: Family, moe: MoeSpec, replicas: int) -> None:
    if replicas < 1:
        raise UnsupportedModelError(f"{FUSE} takes a replica count >= 1, not {replicas}")
    if family.shared_expert_fusion_blocker:
        raise UnsupportedModelError(f"{FUSE}: {family.shared_expert_fusion_blocker}")
    if not family.shared_expert_module or not moe.shared_intermediate:
        raise UnsupportedModelError(f"{FUSE}: this {family.name} model has no shared experts")
    if moe.expert_format not in ("per-expert", "fused-3d"):
        raise UnsupportedModelError(
            f"{FUSE}: this {family.name} model has {moe.format_name}; slots are cloned for per-expert "
            "and 3-D float experts only"
        )


def _describe(tensors: TensorMetas) -> str:
    return ", ".join(f"{suffix} {dtype}" for suffix, (dtype, _) in sorted(tensors.items()))


def _same_format(shared: TensorMetas, routed: TensorMetas) -> bool:
    return set(shared) == set(routed) and all(shared[k][0] == routed[k][0] for k in shared)


def slot_jobs(
    source: CheckpointSource, family: Family, moe: MoeSpec, replicas: int, requantize: bool = False
) -> tuple[list[TensorJob], set[str], str | None]:
    """Every slot tensor of every MoE layer (and the gated families' widened router), the sources consumed,
    and the slots' format change when ``requantize`` had to bring the shared expert to the routed format."""
    slots = slot_count(moe.shared_intermediate, moe.expert_intermediate)
    if moe.expert_format == "fused-3d":
        return (*_experts_3d_jobs(source, family, moe, slots, replicas), None)
    jobs: list[TensorJob] = []
    consumed: set[str] = set()
    requantized: str | None = None
    for layer in moe.moe_layers:
        mlp = decoder_mlp(layer)
        for proj in PROJECTIONS:
            prefix = f"{mlp}.{family.shared_expert_module}.{proj}"
            shared = _tensors_under(source, prefix)
            routed = _tensors_under(source, f"{mlp}.experts.0.{proj}")
            dim = -1 if proj == "down_proj" else 0
            if _same_format(shared, routed):
                jobs += _split_jobs(source, prefix, shared, routed, slots, replicas, moe, dim)
            elif requantize:
                converter = SlotConverter.between(source, prefix, shared, routed)
                jobs += converter.jobs(slots, replicas, moe, dim)
                requantized = converter.describe()
            else:
                raise UnsupportedModelError(
                    f"{FUSE}: {prefix} is [{_describe(shared)}] but the routed experts are "
                    f"[{_describe(routed)}]; mixed formats cannot share one MoE kernel: add "
                    f"{REQUANTIZE} to bring the slots to the routed experts' format"
                )
            consumed |= {f"{prefix}.{suffix}" for suffix in shared}
        if family.shared_expert_gate_module:
            jobs.append(_router_job(source, mlp, family.shared_expert_gate_module))
            consumed |= {f"{mlp}.gate.weight", f"{mlp}.{family.shared_expert_gate_module}.weight"}
    return jobs, consumed, requantized


def _slot_names(moe: MoeSpec, prefix: str, slot: int, replicas: int, suffix: str) -> list[str]:
    """The tensor ``suffix`` of every replica of ``slot`` (``prefix``: the shared expert's projection)."""
    mlp, _, proj = prefix.rsplit(".", 2)
    return [expert_tensor_name(mlp, moe.num_experts + slot * replicas + r, proj, suffix) for r in range(replicas)]


def _split_jobs(
    source: CheckpointSource,
    prefix: str,
    shared: TensorMetas,
    routed: TensorMetas,
    slots: int,
    replicas: int,
    moe: MoeSpec,
    dim: int,
) -> list[TensorJob]:
    """Slots in the shared expert's own format: float weights split and zero-padded, quantized tensors and
    their scales split exactly."""
    jobs = []
    for suffix, (dtype, shape) in shared.items():
        src = f"{prefix}.{suffix}"
        out_shape = routed[suffix][1]
        if dtype in FLOAT_DTYPES and suffix == "weight":
            _check_paddable(src, shape, out_shape, slots, dim)
        else:
            _check_exact_split(src, shape, out_shape, slots, dim)
        for s in range(slots):
            run = partial(read_chunk, name=src, index=s, width=out_shape[dim], dim=dim)
            for name in _slot_names(moe, prefix, s, replicas, suffix):
                jobs.append(TensorJob(TensorEntry(name, dtype, out_shape), (src,), RECIPE_SLOT, run))
    return jobs


@dataclass(frozen=True)
class SlotConverter:
    """Slots of a float shared expert quantized to the routed experts' block fp8, or of a block-fp8 shared
    expert dequantized to the routed experts' float dtype."""

    prefix: str
    shared: TensorMetas
    routed: TensorMetas
    block: tuple[int, int]

    @classmethod
    def between(cls, source: CheckpointSource, prefix: str, shared: TensorMetas, routed: TensorMetas) -> SlotConverter:
        block = fp8_block.block_size(source.config)
        fp8 = {"weight": "F8_E4M3", fp8_block.SCALE_SUFFIX: "F32"}
        formats = [{k: dtype for k, (dtype, _) in t.items()} for t in (shared, routed)]
        is_float = [set(f) == {"weight"} and f["weight"] in FLOAT_DTYPES for f in formats]
        if block is None or not ((is_float[0] and formats[1] == fp8) or (formats[0] == fp8 and is_float[1])):
            raise UnsupportedModelError(
                f"{REQUANTIZE}: {prefix} is [{_describe(shared)}], the routed experts are "
                f"[{_describe(routed)}]; moeprep requantizes between float and block-fp8 experts only"
            )
        return cls(prefix, shared, routed, block)

    @property
    def to_fp8(self) -> bool:
        return fp8_block.SCALE_SUFFIX in self.routed

    def describe(self) -> str:
        bn, bk = self.block
        source, target = (self.shared["weight"][0], self.routed["weight"][0])
        return f"{source} -> {target}" + (f" with [{bn}, {bk}] block scales" if self.to_fp8 else "")

    def jobs(self, slots: int, replicas: int, moe: MoeSpec, dim: int) -> list[TensorJob]:
        shape = self.shared["weight"][1]
        width = self.routed["weight"][1][dim]
        _check_paddable(f"{self.prefix}.weight", shape, self.routed["weight"][1], slots, dim)
        sources = tuple(f"{self.prefix}.{suffix}" for suffix in self.shared)
        jobs = []
        for s in range(slots):
            for suffix, (dtype, out_shape) in self.routed.items():
                run = partial(self._slot_tensor, slot=s, width=width, dim=dim, suffix=suffix, dtype=DTYPES[dtype])
                for name in _slot_names(moe, self.prefix, s, replicas, suffix):
                    jobs.append(TensorJob(TensorEntry(name, dtype, out_shape), sources, RECIPE_REQUANTIZED, run))
        return jobs

    def _slot_tensor(
        self, source: CheckpointSource, slot: int, width: int, dim: int, suffix: str, dtype: torch.dtype
    ) -> torch.Tensor:
        if self.to_fp8:
            weight = read_chunk(source, f"{self.prefix}.weight", slot, width, dim)
            quantized, scale = fp8_block.quantize(weight, self.block)
            return quantized if suffix == "weight" else scale
        scale = source.read(f"{self.prefix}.{fp8_block.SCALE_SUFFIX}")
        weight = fp8_block.dequantize(source.read(f"{self.prefix}.weight"), scale, self.block, torch.float32)
        return padded_chunk(weight, slot, width, dim).to(dtype)


def _check_paddable(src: str, shape: tuple[int, ...], out_shape: tuple[int, ...], slots: int, dim: int) -> None:
    """A floating-point weight fills ``slots`` chunks of the routed shape, the last one zero-padded."""
    other = 1 if dim == 0 else 0
    if len(shape) != 2 or shape[other] != out_shape[other] or shape[dim] > slots * out_shape[dim]:
        raise UnsupportedModelError(
            f"{FUSE}: {src} is {list(shape)}; it does not fit {slots} slots of {list(out_shape)}"
        )


def _check_exact_split(src: str, shape: tuple[int, ...], out_shape: tuple[int, ...], slots: int, dim: int) -> None:
    """Quantized tensors and their scales are split exactly, never padded (a zero-padded scale is not a unit scale)."""
    expected = list(out_shape)
    expected[dim] *= slots
    if list(shape) != expected:
        raise UnsupportedModelError(
            f"{FUSE}: {src} is {list(shape)}; slots of the routed shape {list(out_shape)} need "
            f"exactly {expected} (quantized shared experts are split, not padded)"
        )


def _experts_3d_jobs(
    source: CheckpointSource, family: Family, moe: MoeSpec, slots: int, replicas: int
) -> tuple[list[TensorJob], set[str]]:
    """Experts stored as 3-D tensors (Llama 4: ``experts.gate_up_proj`` [E, H, 2I], gate half first, and
    ``experts.down_proj`` [E, I, H]) rewritten with the slots appended as experts ``E ...``, in that layout."""
    width = moe.expert_intermediate
    jobs, consumed = [], set()
    for layer in moe.moe_layers:
        block = f"model.layers.{layer}.{family.moe_block_module}"
        for proj, parts, dim in (("gate_up_proj", ("gate_proj", "up_proj"), 0), ("down_proj", ("down_proj",), 1)):
            name = f"{block}.experts.{proj}"
            if name not in source.tensor_names:
                raise UnsupportedModelError(
                    f"{FUSE}: {name} not found; slots are cloned for text-only {family.name} "
                    "checkpoints (model.layers.N...)"
                )
            dtype, shape = source.tensor_meta(name)
            shared = tuple(f"{block}.{family.shared_expert_module}.{part}.weight" for part in parts)
            for src in shared:
                src_dtype, src_shape = source.tensor_meta(src)
                if src_dtype != dtype or dtype not in FLOAT_DTYPES:
                    raise UnsupportedModelError(
                        f"{FUSE}: {src} is {src_dtype}, {name} {dtype}; 3-D experts take slots of the same float dtype"
                    )
                _check_paddable(src, src_shape, (width, shape[1]) if dim == 0 else (shape[2], width), slots, dim)
            entry = TensorEntry(name, dtype, (shape[0] + slots * replicas, *shape[1:]))
            run = partial(
                _experts_3d_with_slots, name=name, shared=shared, slots=slots, replicas=replicas, dim=dim, width=width
            )
            jobs.append(TensorJob(entry, (name, *shared), RECIPE_3D_SLOTS, run))
            consumed |= {name, *shared}
    return jobs, consumed


def _experts_3d_with_slots(
    source: CheckpointSource, name: str, shared: tuple[str, ...], slots: int, replicas: int, dim: int, width: int
) -> Iterator[torch.Tensor]:
    """The routed experts' 3-D tensor in row chunks, then every replica of every slot as one more expert:
    gate_up [H, 2I] = [gate rows; up rows].T of the slot's chunk, down [I, H] = the chunk's down columns.T."""
    yield from dim0_chunks(source, name)
    for s in range(slots):
        slot = torch.cat([read_chunk(source, src, s, width, dim) for src in shared], dim).T.contiguous()
        for _ in range(replicas):
            yield slot.unsqueeze(0)


def _router_job(source: CheckpointSource, mlp: str, gate_module: str) -> TensorJob:
    """The router with the shared expert's gate as one more output row: one GEMM yields both."""
    router, gate = f"{mlp}.gate.weight", f"{mlp}.{gate_module}.weight"
    dtype, shape = source.tensor_meta(router)
    if source.tensor_meta(gate)[0] != dtype:
        raise UnsupportedModelError(f"{FUSE}: {gate} is {source.tensor_meta(gate)[0]}, {router} {dtype}")

    def run(src: CheckpointSource) -> torch.Tensor:
        weight = src.read(router)
        return torch.cat([weight, src.read(gate).to(weight.dtype)])

    return TensorJob(TensorEntry(router, dtype, (shape[0] + 1, shape[1])), (router, gate), RECIPE_ROUTER, run)
