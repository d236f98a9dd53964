"""Fused layers run vLLM's Triton MoE kernel with the tile configs tuned for the routed expert count.

vLLM looks its tuned configs (``fused_moe/configs/E=..,N=..,device_name=..``) up by the layer's local expert
count. A fused layer holds ``E + slots * replicas`` experts, a count no file is tuned for, so without this it
silently runs the default tiles where the original runs tuned ones (e.g. DeepSeek-V3 at TP 8 on an H200:
``E=256,N=256,...,block_shape=[128,128]``). A tile config is valid for any expert count (it sizes the
kernel's blocks, not the experts), so the fused layer takes the original count's config when one exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

# A fused layer's local expert count -> the original layer's, for the counts the loaded model built.
ROUTED_EXPERTS_OF: dict[int, int] = {}


def routed_count_lookup(lookup: Callable[..., Any]) -> Callable[..., Any]:
    """``vllm...fused_moe.get_moe_configs`` that first asks for the original count of a fused layer's experts."""

    @functools.wraps(lookup)
    def get_moe_configs(E: int, N: int, dtype: str | None, block_n: int | None = None, block_k: int | None = None):  # noqa: N803  (vLLM's names)
        routed = ROUTED_EXPERTS_OF.get(E)
        tuned = None if routed is None else lookup(routed, N, dtype, block_n, block_k)
        return tuned if tuned is not None else lookup(E, N, dtype, block_n, block_k)

    get_moe_configs.moeprep_routed_lookup = lookup  # type: ignore[attr-defined]
    return get_moe_configs


def use_routed_experts_configs(local_experts: int, local_routed: int) -> None:
    """Layers of ``local_experts`` experts take the tuned configs of ``local_routed`` (installs the lookup once)."""
    from vllm.model_executor.layers.fused_moe import fused_moe as kernels

    ROUTED_EXPERTS_OF[local_experts] = local_routed
    if not hasattr(kernels.get_moe_configs, "moeprep_routed_lookup"):
        kernels.get_moe_configs = routed_count_lookup(kernels.get_moe_configs)
