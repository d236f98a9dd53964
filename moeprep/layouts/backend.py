"""What a layout backend is, as one typed record, and the registry each layout module adds its own to: the
planner asks the registry, never a module's attributes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moeprep.errors import UnsupportedModelError, option
from moeprep.layouts.mxfp4_experts import Mxfp4ExpertDims, PreparedExpertTensor
from moeprep.schema.vllm_versions import VersionRange, describe, in_ranges

Padding = tuple[int, int]  # (hidden, intermediate) multiples of vLLM's parameters
PADDING_ONLY = "none"  # the backend that pads mxfp4 experts and leaves them as stored


@dataclass(frozen=True)
class LayoutBackend:
    """One ``--backend``: the arches and platform its layouts are for, its padding per arch over vLLM releases,
    the transforms of one MoE layer (``prepared_expert_tensors(dims, arch)``) and how vLLM is told to use it."""

    name: str
    arches: tuple[str, ...]
    platform: str  # "cuda" or "cpu": which vLLM builds serve it
    recipe_version: int
    padding: dict[str, tuple[tuple[VersionRange, Padding], ...]]  # arch -> [(vLLM range, padding)]
    prepared_expert_tensors: Callable[[Mxfp4ExpertDims, str], list[PreparedExpertTensor]]
    knobs: dict[str, int] = field(default_factory=dict)  # kernel settings the layout depends on
    serve_flags: tuple[str, ...] = ()  # what ``vllm serve`` needs to pick this kernel
    lora_serve_flags: tuple[str, ...] = ()
    lora_note: str | None = None
    experts_module: str = "mlp.experts.routed_experts"  # where vLLM's gpt-oss keeps the experts

    def recipe_span(self, arch: str, vllm_version: str) -> tuple[list[list[str]], Padding]:
        """The vLLM ranges whose transform gives the bytes of this recipe for ``arch`` and ``vllm_version`` (every
        verified range with the same padding), and that padding; refuses a version outside them."""
        spans = self.padding[arch]
        for span, padding in spans:
            if in_ranges(vllm_version, [span]):
                return [list(other) for other, same in spans if same == padding], padding
        raise UnsupportedModelError(
            f"{self.name} layouts are verified for vLLM {describe([span for span, _ in spans])}, not {vllm_version}; "
            f"pass {option('vllm_version')} with one of those (the folder is served by that vLLM)"
        )


def same_padding(
    arches: tuple[str, ...], ranges: tuple[VersionRange, ...], padding: Padding
) -> dict[str, tuple[tuple[VersionRange, Padding], ...]]:
    """One padding for every arch over every range."""
    return {arch: tuple((span, padding) for span in ranges) for arch in arches}


LAYOUT_BACKENDS: dict[str, LayoutBackend] = {}


def register(backend: LayoutBackend) -> LayoutBackend:
    if backend.name in LAYOUT_BACKENDS:
        raise RuntimeError(f"layout backend {backend.name!r} registered twice")
    LAYOUT_BACKENDS[backend.name] = backend
    return backend
