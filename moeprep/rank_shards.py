"""Per-rank expert shards for tensor and expert parallelism: each rank's experts in its own files.

Tensor parallelism N (vLLM's ``FusedMoE`` without expert parallelism) gives rank r rows
``[r*I/N, (r+1)*I/N)`` of every expert's gate and up projections and the same columns of its down
projection (``w13 = [gate; up]`` per expert, ``w2`` column-sharded). Expert parallelism N gives rank r
whole experts, placed as vLLM's default ``linear`` strategy does (``E // N`` each, the first ``E % N`` ranks
one more, in order). ``convert --tp N`` / ``--ep N`` writes exactly those tensors per rank, under the
checkpoint's own names, into ``model-rank-{r}-part-*.safetensors``, so a rank reads its experts' bytes and
nothing of the other ranks'; everything else stays in the replicated shards vLLM shards itself as usual.
"""

from __future__ import annotations

import re
from functools import partial

import torch

from moeprep.checkpoint.safetensors_io import FLOAT_DTYPES, TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.errors import UnsupportedModelError
from moeprep.families import MoeSpec
from moeprep.plan import TensorJob, dim0_chunks, padded_chunk, read_chunk

RECIPE_TP = "tp-shard"
RECIPE_EP = "ep-expert"
EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def linear_placement(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The global experts vLLM's ``linear`` placement puts on ``ep_rank``."""
    base, remainder = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, remainder)
    return range(start, start + base + (1 if ep_rank < remainder else 0))


def rank_jobs(source: CheckpointSource, moe: MoeSpec, tp_size: int, ep_size: int) -> tuple[list[TensorJob], set[str]]:
    """Every rank's expert tensors (TP slices, or whole experts under EP), and the source tensors they replace."""
    option = f"--ep {ep_size}" if ep_size > 1 else f"--tp {tp_size}"
    if moe.expert_format != "per-expert":
        raise UnsupportedModelError(
            f"{option}: {moe.expert_format} experts are not split per rank yet (per-expert only)"
        )
    if ep_size == 1 and moe.expert_intermediate % tp_size:
        raise UnsupportedModelError(
            f"--tp {tp_size}: the experts' intermediate size {moe.expert_intermediate} does not split into "
            f"{tp_size} equal parts (vLLM needs it to)"
        )
    if ep_size > moe.num_experts:
        raise UnsupportedModelError(f"--ep {ep_size}: the model has only {moe.num_experts} experts")
    layers = set(moe.moe_layers)
    names = [n for n in source.tensor_names if (m := EXPERT_TENSOR.fullmatch(n)) and int(m[1]) in layers]
    if not names:
        raise UnsupportedModelError(f"{option}: no mlp.experts.{{e}}.{{gate,up,down}}_proj weights found to split")
    owner = {e: r for r in range(ep_size) for e in linear_placement(moe.num_experts, ep_size, r)}
    width = moe.expert_intermediate // tp_size
    jobs = []
    for name in names:
        dtype, shape = source.tensor_meta(name)
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"{option}: {name} is {dtype}; per-rank expert shards are written for float experts"
            )
        if ep_size > 1:
            expert = int(EXPERT_TENSOR.fullmatch(name)[2])  # type: ignore[index]
            run = partial(dim0_chunks, name=name)
            jobs.append(TensorJob(TensorEntry(name, dtype, shape), (name,), RECIPE_EP, run, rank=owner[expert]))
            continue
        dim = 1 if name.endswith("down_proj.weight") else 0
        out_shape = (shape[0], width) if dim else (width, shape[1])
        for rank in range(tp_size):
            run = partial(read_chunk, name=name, index=rank, width=width, dim=dim)
            jobs.append(TensorJob(TensorEntry(name, dtype, out_shape), (name,), RECIPE_TP, run, rank=rank))
    return jobs, set(names)


def tensor_parallel_slices(job: TensorJob, tp_size: int) -> list[TensorJob]:
    """An expert tensor another job writes (a fused shared-expert slot) as every TP rank's slice of it, cut like
    the routed experts' (gate/up rows, down columns); other tensors stay replicated."""
    name = job.entry.name
    if not EXPERT_TENSOR.fullmatch(name):
        return [job]
    dim = 1 if name.endswith("down_proj.weight") else 0
    shape = job.entry.shape
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
