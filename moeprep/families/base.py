"""What a model family is: its config, its tensor inventory and where its MoE parts live.

A family module subclasses ``Family`` and registers itself with ``@register_family``. The tensor
inventory (``tensor_specs``) is the single source of truth used both to validate a source
checkpoint and to build tiny fixtures in the exact on-disk format.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moeprep.errors import UnsupportedModelError
from moeprep.families import fp8_block
from moeprep.families.config_view import ConfigView
from moeprep.families.tensor_spec import TensorSpec

# How messages name each expert storage format (``MoeSpec.expert_format``)
EXPERT_FORMAT_NAMES = {
    "mxfp4": "mxfp4 experts",
    "per-expert": "per-expert weight tensors",
    "fused-3d": "3-D expert tensors",
}


@dataclass(frozen=True)
class MoeSpec:
    """The MoE structure of a model, as read from its config."""

    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    expert_intermediate: int
    expert_format: str  # "per-expert" | "fused-3d" | "mxfp4"
    shared_intermediate: int = 0
    shared_gate: bool = False
    routed_scaling_factor: float = 1.0
    renormalize: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def format_name(self) -> str:
        return EXPERT_FORMAT_NAMES[self.expert_format]


class Family:
    """Base class of one architecture. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # CLI name, e.g. "glm4-moe"
    model_types: ClassVar[tuple[str, ...]]
    architecture: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Per-expert LoRA modules vLLM loads, as (gate, up, down) names under ``mlp.experts.{e}``, and whether a
    # fused gate_up projection interleaves gate and up rows (else: all gate rows, then all up rows).
    expert_lora_modules: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    gate_up_interleaved: ClassVar[bool] = False
    # vLLM builds this model's experts as 3-D LoRA modules: per-expert adapters need
    # --enable-mixed-moe-lora-format there.
    vllm_3d_expert_lora: ClassVar[bool] = False
    # Fused shared experts: the shared expert MLP's module under ``mlp`` (None: the family has none), the
    # module of its per-token sigmoid gate, the runtime's architecture for fused folders, or why fusing
    # cannot be served.
    shared_expert_module: ClassVar[str | None] = None
    shared_expert_gate_module: ClassVar[str | None] = None
    fused_shared_architecture: ClassVar[str | None] = None
    shared_expert_fusion_blocker: ClassVar[str | None] = None
    moe_block_module: ClassVar[str] = "mlp"  # the decoder layer's MoE block: model.layers.N.<this>
    router_weight_on_input: ClassVar[bool] = False  # the routing weight scales the expert's input (Llama 4)

    def tiny_config(self) -> dict[str, Any]:
        """A complete config.json for a CPU-sized model in the family's exact format."""
        raise NotImplementedError

    def tensor_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        """Every tensor a checkpoint with ``config`` holds, in on-disk names, shapes and dtypes."""
        raise NotImplementedError

    def moe_spec(self, config: dict[str, Any]) -> MoeSpec:
        raise NotImplementedError

    def as_stored(self, config: ConfigView, tensor_names: Collection[str]) -> ConfigView:
        """``config`` as the plan reads it for a checkpoint holding ``tensor_names``: unchanged, unless a family
        knows parts that config.json counts but checkpoints may leave out (and vLLM serves without)."""
        return config

    def checkpoint_specs(self, config: dict[str, Any]) -> dict[str, TensorSpec]:
        """``tensor_specs`` as stored under ``config``'s quantization (block-scaled fp8 adds weight scales)."""
        return fp8_block.quantized(self.tensor_specs(config), config)

    def preset_config(self, preset: str, num_layers: int | None) -> dict[str, Any]:
        """``tiny`` or one of ``presets`` (real expert dims), optionally with fewer layers."""
        config = self.tiny_config()
        if preset != "tiny":
            if preset not in self.presets:
                known = ", ".join(["tiny", *self.presets])
                raise UnsupportedModelError(f"family {self.name} has no preset {preset!r}; choose one of: {known}")
            config = {**config, **self.presets[preset]}
        if num_layers is not None:
            config = self.with_num_layers(config, num_layers)
        return config

    def with_num_layers(self, config: dict[str, Any], num_layers: int) -> dict[str, Any]:
        return {**config, "num_hidden_layers": num_layers}


REGISTERED: dict[str, Family] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family findable by its CLI name and its ``model_type`` values."""
    family = cls()
    for key in {cls.name, *cls.model_types}:
        if key in REGISTERED:
            raise RuntimeError(f"family key {key!r} registered twice")
        REGISTERED[key] = family
    return cls
