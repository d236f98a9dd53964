"""Source + target -> the list of tensor jobs a conversion runs (what ``--dry-run`` prints).

Each job names its output tensor (the vLLM parameter it fills, or the original name when the
tensor passes through), the source tensors it reads and the recipe that turns one into the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moeprep.checkpoint.manifest import Target
from moeprep.checkpoint.safetensors_io import TensorEntry
from moeprep.checkpoint.source import CheckpointSource
from moeprep.errors import CheckpointError, UnsupportedModelError
from moeprep.families import Family, MoeSpec, family_for_config

PASSTHROUGH = "passthrough"
BACKENDS = ("none",)
PASSTHROUGH_VERIFIED_VLLM = ["0.26.0", "0.32.0"]


@dataclass(frozen=True)
class TensorJob:
    entry: TensorEntry
    sources: tuple[str, ...]
    recipe: str
    run: Callable[[CheckpointSource], torch.Tensor] = field(compare=False, repr=False)


@dataclass
class Plan:
    family: Family
    moe: MoeSpec
    target: Target
    jobs: list[TensorJob]
    unknown_tensors: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(job.entry.nbytes for job in self.jobs)

    def summary(self) -> dict[str, Any]:
        recipes: dict[str, int] = {}
        for job in self.jobs:
            recipes[job.recipe] = recipes.get(job.recipe, 0) + 1
        return {
            "family": self.family.name,
            "backend": self.target.backend,
            "tensors": len(self.jobs),
            "bytes": self.total_bytes,
            "recipes": recipes,
            "moe_layers": len(self.moe.moe_layers),
            "experts": self.moe.num_experts,
            "top_k": self.moe.top_k,
            "not_in_family_inventory": len(self.unknown_tensors),
        }


def check_inventory(source: CheckpointSource, family: Family) -> list[str]:
    """Every tensor the family expects is present with its shape and dtype; returns the extras."""
    expected = family.tensor_specs(source.config)
    present = set(source.tensor_names)
    missing = [name for name in expected if name not in present]
    if missing:
        raise CheckpointError(
            f"{source.location}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) for a "
            f"{family.name} model with this config.json; the checkpoint is incomplete or config.json does not match it"
        )
    for name, spec in expected.items():
        dtype, shape = source.tensor_meta(name)
        if shape != spec.shape or dtype != spec.dtype:
            raise CheckpointError(
                f"{source.location}: tensor {name!r} is {dtype}{list(shape)}, config.json implies "
                f"{spec.dtype}{list(spec.shape)}; the checkpoint does not match its config"
            )
    return sorted(present - set(expected))


def _passthrough_job(source: CheckpointSource, name: str) -> TensorJob:
    dtype, shape = source.tensor_meta(name)
    return TensorJob(TensorEntry(name, dtype, shape), (name,), PASSTHROUGH, lambda src, n=name: src.read(n))


def build_plan(source: CheckpointSource, backend: str = "none") -> Plan:
    """Validate the source against its family and list the jobs for ``backend``."""
    if backend not in BACKENDS:
        raise UnsupportedModelError(f"backend {backend!r} is not available; choose one of: {', '.join(BACKENDS)}")
    family = family_for_config(source.config)
    unknown = check_inventory(source, family)
    target = Target(
        backend=backend, recipe=PASSTHROUGH, recipe_version=1, vllm_versions=list(PASSTHROUGH_VERIFIED_VLLM)
    )
    jobs = [_passthrough_job(source, name) for name in source.tensor_names]
    return Plan(family, family.moe_spec(source.config), target, jobs, unknown)
