"""gpt-oss-style mxfp4 experts -> prepared tensors for one backend.

A backend module lists ``PreparedExpertTensor`` recipes; each turns one checkpoint tensor of a MoE
layer (``{experts}.gate_up_proj_blocks`` ...) into the storage bytes of one parameter that the
moeprep runtime registers on vLLM's experts module (``{experts}.moeprep_w13_value`` ...). Transforms
take a slice of experts (dim 0) so conversion streams with bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeprep.layouts.padding import pad_to
from moeprep.schema.names import PREPARED_W2, PREPARED_W13

MXFP4_BLOCK = 32


@dataclass(frozen=True)
class Mxfp4ExpertDims:
    """Per-layer expert sizes: as in the checkpoint and as padded by the backend (per TP rank)."""

    experts: int
    hidden: int
    intermediate: int
    hidden_padded: int
    intermediate_padded: int


@dataclass(frozen=True)
class PreparedExpertTensor:
    """One prepared parameter: stored as ``storage_shape`` bytes, held by vLLM as the view
    ``view_shape``/``view_strides`` of that storage."""

    param: str
    source: str
    dtype: str
    storage_shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    view_strides: tuple[int, ...]
    recipe: str
    transform: Callable[[torch.Tensor], torch.Tensor]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def transposed_view(storage_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape and strides of ``storage.mT`` for a contiguous 3-D storage."""
    e, rows, cols = storage_shape
    return (e, cols, rows), (rows * cols, 1, cols)


def packed_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, K/32, 16] checkpoint blocks -> [E, N, K/2] bytes (the view vLLM's loader takes)."""
    return blocks.reshape(blocks.shape[0], blocks.shape[1], -1)


Projection = Callable[[str, str, int, int, int], list[PreparedExpertTensor]]


def gate_up_and_down(projection: Projection, dims: Mxfp4ExpertDims) -> list[PreparedExpertTensor]:
    """``projection(prefix, source, rows, reduction, experts)`` for w13 = gate_up (rows 2*I', reduction H')
    and w2 = down (rows H', reduction I'), at the backend's padded sizes."""
    return [
        *projection(PREPARED_W13, "gate_up_proj", 2 * dims.intermediate_padded, dims.hidden_padded, dims.experts),
        *projection(PREPARED_W2, "down_proj", dims.hidden_padded, dims.intermediate_padded, dims.experts),
    ]


Layout = tuple[str, tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]  # dtype, stored shape, layout


def then(first: Callable[[torch.Tensor], torch.Tensor], second: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``second(first(x))``."""
    return lambda tensor: second(first(tensor))


def padded_projection(
    prefix: str, source: str, recipe: str, rows: int, k: int, weight: Layout, scale: Layout, bias: Layout
) -> list[PreparedExpertTensor]:
    """Prepared tensors held by vLLM as they are stored: ``{prefix}_{weight,scale,bias}`` from
    ``{source}_{blocks,scales,bias}`` (recipes ``{recipe}-weight`` ...), each the layout of the checkpoint tensor
    zero-padded to ``rows`` outputs and reduction ``k`` as vLLM's loader fills its parameters: packed e2m1 bytes
    [E, rows, k/2] (gate/up rows interleaved), e8m0 scales [E, rows, k/32], bf16 biases [E, rows]."""

    def pad_weight(blocks: torch.Tensor) -> torch.Tensor:
        return pad_to(packed_blocks(blocks), (blocks.shape[0], rows, k // 2))

    def pad_scale(scales: torch.Tensor) -> torch.Tensor:
        return pad_to(scales, (scales.shape[0], rows, k // MXFP4_BLOCK))

    def pad_bias(values: torch.Tensor) -> torch.Tensor:
        return pad_to(values, (values.shape[0], rows))

    parts = (
        ("weight", "blocks", pad_weight, weight),
        ("scale", "scales", pad_scale, scale),
        ("bias", "bias", pad_bias, bias),
    )
    return [
        PreparedExpertTensor(
            f"{prefix}_{part}",
            f"{source}_{suffix}",
            dtype,
            shape,
            shape,
            contiguous_strides(shape),
            f"{recipe}-{part}",
            then(pad, layout),
        )
        for part, suffix, pad, (dtype, shape, layout) in parts
    ]


def loaded_parameters(recipe: str) -> Projection:
    """The projection of vLLM's mxfp4 expert parameters as its loader fills them, before any kernel transform."""

    def projection(prefix: str, source: str, rows: int, k: int, experts: int) -> list[PreparedExpertTensor]:
        keep = torch.Tensor.contiguous
        return padded_projection(
            prefix,
            source,
            recipe,
            rows,
            k,
            weight=("U8", (experts, rows, k // 2), keep),
            scale=("U8", (experts, rows, k // MXFP4_BLOCK), keep),
            bias=("BF16", (experts, rows), keep),
        )

    return projection


@dataclass(frozen=True)
class Mxfp4Partition:
    """One tensor-parallel rank's share of the experts' intermediate size, as vLLM 0.26's gpt-oss loader cuts it:
    ``cdiv(I/32, N)`` scale groups per rank, the last rank the rest (possibly fewer), intermediate columns
    ``[start, end)``; the parameters it lands in hold ``round_up(I // N, multiple)`` (vLLM's per-partition size
    rounded up by the kernel's padding rule)."""

    rank: int
    start: int
    end: int

    @staticmethod
    def of(intermediate: int, tp_size: int) -> list[Mxfp4Partition]:
        per_rank = -(-intermediate // MXFP4_BLOCK // tp_size) * MXFP4_BLOCK
        return [
            Mxfp4Partition(r, min(r * per_rank, intermediate), min((r + 1) * per_rank, intermediate))
            for r in range(tp_size)
        ]

    def cut(self, source: str, experts: torch.Tensor) -> torch.Tensor:
        """This rank's part of a chunk of experts of the checkpoint tensor ``{experts}.{source}``: gate/up rows
        ``[2*start, 2*end)`` (interleaved), down columns ``[start, end)``; the down bias on rank 0 only (vLLM
        zeroes it on the others, since the ranks' outputs are summed)."""
        if source.startswith("gate_up_proj"):
            return experts[:, 2 * self.start : 2 * self.end].contiguous()
        if source == "down_proj_bias":
            return experts if self.rank == 0 else torch.zeros_like(experts)
        groups = slice(self.start // MXFP4_BLOCK, self.end // MXFP4_BLOCK)
        return experts[:, :, groups].contiguous()  # down blocks [E, H, I/32, 16] and scales [E, H, I/32]
