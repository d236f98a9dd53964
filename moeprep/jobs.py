"""A tensor job (one output tensor, the source tensors it reads and how) and the chunked readers jobs are built
from: the leaf that the planners (``plan``, ``rank_shards``, ``shared_experts``) share."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

from moeprep.checkpoint.safetensors_io import TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.layouts.mxfp4_experts import contiguous_strides
from moeprep.schema.manifest import PASSTHROUGH_RECIPE

# Above glibc's largest dynamic mmap threshold (32 MiB), so chunk buffers are mmap'd and returned to the
# OS when freed; smaller chunks linger in per-thread malloc arenas and peak RSS grows. About five chunks are
# in flight (one being produced, two queued, one written while the one before is still hashed).
CHUNK_BYTES = 48 * 1024 * 1024


@dataclass(frozen=True)
class TensorJob:
    """Write ``entry`` (the stored bytes) from ``sources``; vLLM holds it as ``view_shape``/``view_strides``."""

    entry: TensorEntry
    sources: tuple[str, ...]
    recipe: str
    run: Callable[[CheckpointSource], torch.Tensor | Iterable[torch.Tensor]] = field(compare=False, repr=False)
    view_shape: tuple[int, ...] = ()
    view_strides: tuple[int, ...] = ()
    rank: int | None = None  # a tensor-parallel rank's own tensor (None: every rank reads it)

    def __post_init__(self) -> None:
        if not self.view_shape:
            object.__setattr__(self, "view_shape", self.entry.shape)
            object.__setattr__(self, "view_strides", contiguous_strides(self.entry.shape))


def dim0_chunks(
    source: CheckpointSource,
    name: str,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: range | None = None,
) -> Iterator[torch.Tensor]:
    """``name`` (only its dim-0 ``rows``, when given) read in slices along dim 0 of at most CHUNK_BYTES, each
    passed through ``transform``."""
    dtype, shape = source.tensor_meta(name)
    if not shape or shape[0] == 0:
        yield source.read(name)
        return
    per_row = max(1, TensorEntry(name, dtype, shape).nbytes // shape[0])
    step = max(1, CHUNK_BYTES // per_row)
    rows = range(shape[0]) if rows is None else rows
    for start in range(rows.start, rows.stop, step):
        stop = min(rows.stop, start + step)
        # No name holds the rows read here: the transform can let them go (``_on_device``), and the result
        # is the consumer's alone once yielded.
        yield transform(source.read_rows(name, start, stop)) if transform else source.read_rows(name, start, stop)


def padded_chunk(tensor: torch.Tensor, index: int, width: int, dim: int) -> torch.Tensor:
    """Columns (``dim=-1``) or rows (``dim=0``) ``[index*width, (index+1)*width)`` of ``tensor``, zero-padded
    past its end."""
    start = index * width
    part = tensor.narrow(dim, start, max(0, min(width, tensor.shape[dim] - start)))
    if part.shape[dim] == width:
        return part.contiguous()
    shape = list(tensor.shape)
    shape[dim] = width
    out = torch.zeros(shape, dtype=tensor.dtype)
    out.narrow(dim, 0, part.shape[dim]).copy_(part)
    return out


def read_chunk(source: CheckpointSource, name: str, index: int, width: int, dim: int) -> torch.Tensor:
    """``padded_chunk`` of the source tensor ``name``; a row chunk reads only its own rows."""
    if dim != 0:
        return padded_chunk(source.read(name), index, width, dim)
    rows = source.tensor_meta(name)[1][0]
    start = min(index * width, rows)
    return padded_chunk(source.read_rows(name, start, min(start + width, rows)), 0, width, 0)


def passthrough_job(source: CheckpointSource, name: str) -> TensorJob:
    dtype, shape = source.tensor_meta(name)
    return TensorJob(TensorEntry(name, dtype, shape), (name,), PASSTHROUGH_RECIPE, partial(dim0_chunks, name=name))
