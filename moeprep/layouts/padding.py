"""Zero padding of mxfp4 expert tensors to a backend's size multiples."""

from __future__ import annotations

import torch


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pad_to(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad ``tensor`` at the end of each dimension up to ``shape`` (no copy if already there)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if len(shape) != tensor.dim() or any(have > want for have, want in zip(tensor.shape, shape, strict=True)):
        raise ValueError(f"cannot pad {tuple(tensor.shape)} down to {tuple(shape)}")
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, d) for d in tensor.shape)] = tensor
    return out
