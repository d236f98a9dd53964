"""The tensor names the converter writes and the plugin reads, in one table (as llama.cpp's ``tensor_mapping``):
per-expert checkpoint tensors, the slots of fused shared experts, per-rank expert files, the prepared mxfp4
parameters registered on vLLM's experts module, and the module names of PEFT adapters on experts."""

from __future__ import annotations

import re
from typing import NamedTuple

SCALE_SUFFIX = "weight_scale_inv"  # a block-fp8 weight's scales, beside ``weight``
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # one expert's linear layers (vLLM's checkpoint names)
PREPARED_PARAM_PREFIX = "moeprep_"  # parameters the plugin registers on vLLM's experts module
PREPARED_W13, PREPARED_W2 = f"{PREPARED_PARAM_PREFIX}w13", f"{PREPARED_PARAM_PREFIX}w2"  # gate_up and down

_EXPERT_TENSOR = re.compile(
    rf"(?P<mlp>.+\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>{'|'.join(PROJECTIONS)})\.(?P<kind>.+)"
)
_DECODER_MLP = re.compile(r"model\.layers\.(\d+)\.mlp")

# PEFT adapter modules on experts: per expert (``...experts.{e}.{proj}``), vLLM's 3-D layout (``...experts``,
# ``...experts.base_layer``), and the decoder layer a module belongs to.
ADAPTER_PER_EXPERT = re.compile(r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)")
ADAPTER_FUSED_3D = re.compile(r"(?P<prefix>.*\.experts)(?P<nested>\.base_layer)?")
ADAPTER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ExpertTensor(NamedTuple):
    """A per-expert tensor ``{mlp}.experts.{expert}.{proj}.{kind}`` (kind: ``weight``, ``weight_scale_inv``...)."""

    mlp: str
    expert: int
    proj: str
    kind: str

    @property
    def name(self) -> str:
        return expert_tensor_name(self.mlp, self.expert, self.proj, self.kind)

    @property
    def decoder_layer(self) -> int | None:
        """N where ``mlp`` is a decoder layer's ``model.layers.N.mlp``, else None."""
        match = _DECODER_MLP.fullmatch(self.mlp)
        return int(match[1]) if match else None


def expert_tensor_name(mlp: str, expert: int, proj: str, kind: str = "weight") -> str:
    return f"{mlp}.experts.{expert}.{proj}.{kind}"


def parse_expert_tensor(name: str) -> ExpertTensor | None:
    """The parts of a per-expert tensor name, or None for any other tensor."""
    match = _EXPERT_TENSOR.fullmatch(name)
    return ExpertTensor(match["mlp"], int(match["expert"]), match["proj"], match["kind"]) if match else None


def decoder_mlp(layer: int) -> str:
    """The MLP module of decoder layer ``layer``, where the per-expert families keep their experts."""
    return f"model.layers.{layer}.mlp"


def prepared_param_names(*parts: str) -> tuple[str, ...]:
    """The prepared parameters ``moeprep_w13_{part}`` and ``moeprep_w2_{part}`` for each part."""
    return tuple(f"{proj}_{part}" for proj in (PREPARED_W13, PREPARED_W2) for part in parts)


def is_prepared_param(name: str) -> bool:
    """A tensor moeprep laid out for a parameter it registers itself (``...experts.moeprep_w13_value``)."""
    return name.rpartition(".")[2].startswith(PREPARED_PARAM_PREFIX)
