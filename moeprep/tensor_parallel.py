"""Tensor-parallel expert shards: each rank's part of every routed expert, in that rank's own files.

vLLM's ``FusedMoE`` under tensor parallelism N (no expert parallelism) gives rank r rows
``[r*I/N, (r+1)*I/N)`` of every expert's gate and up projections and the same columns of its down
projection (``w13 = [gate; up]`` per expert, ``w2`` column-sharded). ``convert --tp N`` writes exactly
those slices per rank, under the checkpoint's own names, into ``model-rank-{r}-part-*.safetensors``, so a
rank reads its experts' bytes and nothing of the other ranks'; everything else stays in the replicated
shards that vLLM shards itself as usual.
"""

from __future__ import annotations

import re
from functools import partial

import torch

from moeprep.checkpoint.safetensors_io import FLOAT_DTYPES, TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.errors import UnsupportedModelError
from moeprep.families import MoeSpec
from moeprep.plan import TensorJob

RECIPE = "tp-shard"
EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def rank_jobs(source: CheckpointSource, moe: MoeSpec, tp_size: int) -> tuple[list[TensorJob], set[str]]:
    """Every rank's slice of every routed expert tensor, and the source tensors they replace."""
    if moe.expert_format != "per-expert":
        raise UnsupportedModelError(f"--tp: {moe.expert_format} experts are not split per rank yet (per-expert only)")
    if moe.expert_intermediate % tp_size:
        raise UnsupportedModelError(
            f"--tp {tp_size}: the experts' intermediate size {moe.expert_intermediate} does not split into "
            f"{tp_size} equal parts (vLLM needs it to)"
        )
    layers = set(moe.moe_layers)
    names = [n for n in source.tensor_names if (m := EXPERT_TENSOR.fullmatch(n)) and int(m[1]) in layers]
    if not names:
        raise UnsupportedModelError("--tp: no mlp.experts.{e}.{gate,up,down}_proj weights found to split")
    width = moe.expert_intermediate // tp_size
    jobs = []
    for name in names:
        dtype, shape = source.tensor_meta(name)
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"--tp: {name} is {dtype}; per-rank expert shards are written for float experts"
            )
        dim = 1 if name.endswith("down_proj.weight") else 0
        out_shape = (shape[0], width) if dim else (width, shape[1])
        for rank in range(tp_size):
            run = partial(_rank_slice, name=name, start=rank * width, width=width, dim=dim)
            jobs.append(TensorJob(TensorEntry(name, dtype, out_shape), (name,), RECIPE, run, rank=rank))
    return jobs, set(names)


def _rank_slice(source: CheckpointSource, name: str, start: int, width: int, dim: int) -> torch.Tensor:
    if dim == 0:
        return source.read_rows(name, start, start + width)
    return source.read(name).narrow(1, start, width).contiguous()
