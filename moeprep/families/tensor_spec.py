"""One checkpoint tensor's expected shape and dtype: the leaf that the family inventory and the block-fp8 format
share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape/dtype of one checkpoint tensor and how a fixture fills it.

    ``init``: ``linear`` (normal, std 1/sqrt(fan_in)), ``norm`` (1 + small noise), ``bias`` (small
    normal), ``mxfp4_blocks`` (random bytes), ``e8m0_scales`` (random exponents near 2^0), ``fp8``
    (standard normal in e4m3), ``fp8_scale`` (positive, near 1/sqrt(fan_in): fp8 * scale is a ``linear``).
    ``fan_in_dim`` is the input dimension (-2 for fused 3-D experts applied as ``x @ W``); ``fan_in``
    overrides it where the input size is not one of the tensor's dims (block scales).
    """

    shape: tuple[int, ...]
    dtype: str = "BF16"
    init: str = "linear"
    fan_in_dim: int = -1
    fan_in: int | None = None

    @property
    def fan_in_size(self) -> int:
        return self.fan_in or self.shape[self.fan_in_dim]
