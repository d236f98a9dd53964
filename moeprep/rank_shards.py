"""Per-rank expert shards for tensor and expert parallelism: each rank's experts in its own files.

Tensor parallelism N (vLLM's ``FusedMoE`` without expert parallelism) gives rank r rows
``[r*I/N, (r+1)*I/N)`` of every expert's gate and up projections and the same columns of its down
projection (``w13 = [gate; up]`` per expert, ``w2`` column-sharded). Expert parallelism N gives rank r
whole experts, placed as vLLM's default ``linear`` strategy does (``E // N`` each, the first ``E % N`` ranks
one more, in order). ``convert --tp N`` / ``--ep N`` writes exactly those tensors per rank, under the
checkpoint's own names, into ``model-rank-{r}-part-*.safetensors``, so a rank reads its experts' bytes and
nothing of the other ranks'; block-fp8 experts take their ``weight_scale_inv`` blocks along. Everything else
stays in the replicated shards vLLM shards itself as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from moeprep.checkpoint.safetensors_io import FLOAT_DTYPES, TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.errors import UnsupportedModelError, option
from moeprep.families import MoeSpec, fp8_block
from moeprep.jobs import TensorJob, dim0_chunks, padded_chunk, read_chunk
from moeprep.schema.names import SCALE_SUFFIX, ExpertTensor, parse_expert_tensor
from moeprep.schema.routing import FusedSharedExperts

RECIPE_TP = "tp-shard"
RECIPE_EP = "ep-expert"


def decoder_expert_tensor(name: str) -> ExpertTensor | None:
    """A decoder layer's per-expert weight or block-fp8 scale (``model.layers.N.mlp.experts.E.{proj}.{kind}``)."""
    parsed = parse_expert_tensor(name)
    if parsed and parsed.decoder_layer is not None and parsed.kind in ("weight", SCALE_SUFFIX):
        return parsed
    return None


def linear_placement(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The global experts vLLM's ``linear`` placement puts on ``ep_rank``."""
    base, remainder = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, remainder)
    return range(start, start + base + (1 if ep_rank < remainder else 0))


@dataclass(frozen=True)
class SpreadSlotPlacement:
    """Expert parallelism with fused shared-expert slots: every rank holds ``replicas / ep_size`` replicas of every
    slot beside its ``E / ep_size`` routed experts, so the shared experts' work is spread over the ranks (token
    ``t`` takes replica ``t % replicas``). vLLM places experts linearly (rank r: ids ``[r*B, (r+1)*B)``, ``B =
    (E + slots * replicas) / ep_size``), so the ids are interleaved: rank r's block is its routed experts, then its
    replicas. The checkpoint's ids (routed ``0..E-1``, then slot ``s`` replica ``p`` at ``E + s*replicas + p``)
    are renamed to these; the routing contract maps the router's ids (``routed_ids``) and names the slots'."""

    routed: int
    slots: int
    replicas: int
    ep_size: int

    @classmethod
    def checked(cls, routed: int, slots: int, replicas: int, ep_size: int) -> SpreadSlotPlacement:
        if routed % ep_size or replicas % ep_size:
            raise UnsupportedModelError(
                f"{option('ep_size', ep_size)} with {option('fuse_shared_replicas', replicas)}: each rank holds "
                f"replicas/{ep_size} replicas "
                f"of every slot and {routed}/{ep_size} routed experts; use a replica count that is a multiple of "
                f"{ep_size} (and an {option('ep_size')} that divides {routed})"
            )
        return cls(routed, slots, replicas, ep_size)

    @property
    def per_rank(self) -> int:
        return (self.routed + self.slots * self.replicas) // self.ep_size

    def global_id(self, checkpoint_id: int) -> int:
        """The MoE layer's id of the checkpoint's expert ``checkpoint_id`` (routed, or a slot replica after them)."""
        routed_per_rank = self.routed // self.ep_size
        if checkpoint_id < self.routed:
            rank, offset = divmod(checkpoint_id, routed_per_rank)
            return rank * self.per_rank + offset
        slot, replica = divmod(checkpoint_id - self.routed, self.replicas)
        rank, offset = divmod(replica, self.replicas // self.ep_size)
        return rank * self.per_rank + routed_per_rank + slot * (self.replicas // self.ep_size) + offset

    def spread(self, contract: FusedSharedExperts) -> FusedSharedExperts:
        """``contract`` with this placement: the layer id of every router expert and slot replica."""
        return contract.spread(
            f"slot replicas spread over {self.ep_size} expert-parallel ranks (linear blocks of "
            f"{self.per_rank}: each rank's routed experts, then its replicas)",
            [self.global_id(e) for e in range(self.routed)],
            [[self.global_id(e) for e in replicas] for replicas in contract.slot_ids],
        )

    def place(self, job: TensorJob) -> TensorJob:
        """``job`` under its expert's layer id, in the file of the rank that holds it (other tensors unchanged)."""
        parsed = decoder_expert_tensor(job.entry.name)
        if not parsed:
            return job
        expert = self.global_id(parsed.expert)
        name = parsed._replace(expert=expert).name
        recipe = job.recipe if job.recipe == RECIPE_EP else f"{job.recipe}+{RECIPE_EP}"
        return replace(job, entry=replace(job.entry, name=name), recipe=recipe, rank=expert // self.per_rank)


RANK_SPLIT_FORMATS = ("per-expert",)  # expert storage formats whose experts are split into per-rank files


def rank_jobs(source: CheckpointSource, moe: MoeSpec, tp_size: int, ep_size: int) -> tuple[list[TensorJob], set[str]]:
    """Every rank's expert tensors (TP slices, or whole experts under EP), and the source tensors they replace.
    Block-fp8 experts (DeepSeek-V3 FP8) bring their ``weight_scale_inv`` along, sliced by whole blocks."""
    named = option("ep_size", ep_size) if ep_size > 1 else option("tp_size", tp_size)
    if moe.expert_format not in RANK_SPLIT_FORMATS:
        raise UnsupportedModelError(
            f"{named}: {moe.format_name} are not split per rank yet (per-expert weight tensors only)"
        )
    if ep_size == 1 and moe.expert_intermediate % tp_size:
        raise UnsupportedModelError(
            f"{option('tp_size', tp_size)}: the experts' intermediate size {moe.expert_intermediate} does not "
            f"split into {tp_size} equal parts (vLLM needs it to)"
        )
    layers = set(moe.moe_layers)
    names = [n for n in source.tensor_names if (t := decoder_expert_tensor(n)) and t.decoder_layer in layers]
    if not names:
        raise UnsupportedModelError(f"{named}: no mlp.experts.{{e}}.{{gate,up,down}}_proj weights found to split")
    owner = {e: r for r in range(ep_size) for e in linear_placement(moe.num_experts, ep_size, r)}
    block = fp8_block.block_size(source.config)
    jobs = []
    for name in names:
        dtype, shape = source.tensor_meta(name)
        if dtype not in (*FLOAT_DTYPES, "F8_E4M3"):  # block-fp8 weights; their scales are F32
            raise UnsupportedModelError(
                f"{named}: {name} is {dtype}; per-rank expert shards are written for float and block-fp8 experts"
            )
        if ep_size > 1:
            expert = decoder_expert_tensor(name).expert  # type: ignore[union-attr]
            run = partial(dim0_chunks, name=name)
            jobs.append(TensorJob(TensorEntry(name, dtype, shape), (name,), RECIPE_EP, run, rank=owner[expert]))
            continue
        dim, width = tensor_parallel_cut(name, shape, moe.expert_intermediate // tp_size, block, named)
        out_shape = (shape[0], width) if dim else (width, shape[1])
        for rank in range(tp_size):
            run = partial(read_chunk, name=name, index=rank, width=width, dim=dim)
            jobs.append(TensorJob(TensorEntry(name, dtype, out_shape), (name,), RECIPE_TP, run, rank=rank))
    return jobs, set(names)


def tensor_parallel_cut(
    name: str, shape: tuple[int, ...], width: int, block: tuple[int, int] | None, named: str
) -> tuple[int, int]:
    """(dim, width per rank) of an expert tensor under TP: gate/up rows, down columns, ``width`` intermediate
    entries each; a block-fp8 scale by whole blocks, so a rank's share must be a multiple of the block (vLLM
    refuses other sizes for block-fp8 MoE too)."""
    _, _, proj, kind = decoder_expert_tensor(name)  # type: ignore[misc]
    dim = 1 if proj == "down_proj" else 0
    if block is None:
        return dim, width
    if width % block[dim]:
        raise UnsupportedModelError(
            f"{named}: each rank's {width} intermediate columns are not whole fp8 blocks of {block[dim]} "
            f"(vLLM needs them to be); use another {option('tp_size')}"
        )
    return dim, width // block[dim] if kind == SCALE_SUFFIX else width


def tensor_parallel_slices(job: TensorJob, tp_size: int) -> list[TensorJob]:
    """An expert tensor another job writes (a fused shared-expert slot, or its block-fp8 scale) as every TP rank's
    slice of it, cut like the routed experts' (gate/up rows, down columns); other tensors stay replicated."""
    name = job.entry.name
    if not decoder_expert_tensor(name):
        return [job]
    shape = job.entry.shape
    dim = 1 if ".down_proj." in name else 0  # a block-fp8 slot's scale splits with its weight, in blocks
    if shape[dim] % tp_size:
        raise UnsupportedModelError(
            f"{option('tp_size', tp_size)}: {name} {list(shape)} does not split into {tp_size} equal parts"
        )
    width = shape[dim] // tp_size
    out_shape = (shape[0], width) if dim else (width, shape[1])
    recipe = f"{job.recipe}+{RECIPE_TP}"
    return [
        TensorJob(
            TensorEntry(name, job.entry.dtype, out_shape),
            job.sources,
            recipe,
            partial(_slice_of_job, job=job, index=rank, width=width, dim=dim),
            rank=rank,
        )
        for rank in range(tp_size)
    ]


def _slice_of_job(source: CheckpointSource, job: TensorJob, index: int, width: int, dim: int) -> torch.Tensor:
    produced = job.run(source)
    tensor = produced if isinstance(produced, torch.Tensor) else torch.cat(list(produced))
    return padded_chunk(tensor, index, width, dim)
