"""PEFT LoRA adapter folders: ``adapter_config.json`` (validated) and ``adapter_model.safetensors``.

A module's LoRA is the pair ``{module}.lora_A.weight`` [r, in] and ``{module}.lora_B.weight`` [out, r];
its update is ``scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where
``rank_pattern`` / ``alpha_pattern`` may override r and alpha per module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprep.checkpoint.safetensors_io import read_header, read_tensor
from moeprep.errors import LoraError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide what the tensors mean."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    target_parameters: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    raw: dict[str, Any] = field(repr=False)

    def rank_for(self, key: str) -> int:
        """``r`` for the module (or parameter) ``key``, after ``rank_pattern``."""
        return int(_pattern_value(self.rank_pattern, key, self.r))

    def scaling(self, key: str) -> float:
        alpha, rank = float(_pattern_value(self.alpha_pattern, key, self.lora_alpha)), self.rank_for(key)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies when it matches the whole key or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", key):
            return value
    return default


def parse_adapter_config(data: Any, where: str) -> AdapterConfig:
    """Validate a decoded ``adapter_config.json``; raise ``LoraError`` naming the field on any problem."""
    if not isinstance(data, dict):
        raise LoraError(f"{where}: not a JSON object; is this a PEFT adapter folder?")
    if data.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{where}: peft_type {data.get('peft_type')!r} is not LORA; only LoRA adapters are supported")
    for flag in ("use_dora", "fan_in_fan_out"):
        if data.get(flag):
            raise LoraError(f"{where}: {flag} adapters are not supported; train a plain LoRA adapter")
    if data.get("bias", "none") != "none" or data.get("lora_bias"):
        raise LoraError(f"{where}: adapters with trained biases are not supported")

    def typed(name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = data.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise LoraError(f"{where}: field {name!r} is {value!r}; expected {getattr(kind, '__name__', kind)}")
        return value

    r = typed("r", int, 8)
    alpha = typed("lora_alpha", (int, float), r)
    if r <= 0 or not math.isfinite(alpha):
        raise LoraError(f"{where}: r={r!r}, lora_alpha={alpha!r} must be a positive rank and a finite alpha")
    targets = typed("target_modules", (list, str), [])
    targets = [targets] if isinstance(targets, str) else targets
    parameters = typed("target_parameters", list, [])
    ranks, alphas = typed("rank_pattern", dict, {}), typed("alpha_pattern", dict, {})
    for name, values, kind in (("target_modules", targets, str), ("target_parameters", parameters, str)):
        if not all(isinstance(v, kind) for v in values):
            raise LoraError(f"{where}: {name} must be a list of strings")
    for name, pattern, kind in (("rank_pattern", ranks, int), ("alpha_pattern", alphas, (int, float))):
        for key, value in pattern.items():
            if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < math.inf:
                raise LoraError(f"{where}: {name}[{key!r}] = {value!r} is not a positive number")
            try:
                re.compile(key)
            except re.error as exc:
                raise LoraError(f"{where}: {name} key {key!r} is not a regular expression ({exc})") from exc
    return AdapterConfig(
        r, float(alpha), typed("use_rslora", bool, False), targets, parameters, ranks, alphas, dict(data)
    )


def load_adapter_config(folder: Path) -> AdapterConfig:
    path = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LoraError(f"{path} not found; is {folder} a PEFT LoRA adapter folder?") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoraError(f"{path}: not valid JSON ({exc}); fix or re-export the adapter") from exc
    return parse_adapter_config(data, str(path))


@dataclass
class LoraPair:
    """One module's LoRA: ``a`` [r, in], ``b`` [out, r], update ``scaling * b @ a``."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def load_adapter_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path (without PEFT's prefix): {"A": lora_A, "B": lora_B}}; any other tensor is an error."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise LoraError(f"{path} not found; moeprep reads adapters saved as safetensors (PEFT's default)")
    header = read_header(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in header.tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise LoraError(
                f"{path}: tensor {name!r} is not a lora_A/lora_B weight; embeddings, biases, DoRA magnitudes and "
                "modules_to_save are not supported"
            )
        module = name.removesuffix(suffix).removeprefix(PEFT_PREFIX)
        modules.setdefault(module, {})[suffix[6]] = read_tensor(path, info)
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{path}: module {module!r} has lora_{next(iter(pair))} but not its partner")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(
                f"{path}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                "expected [r, in] and [out, r]"
            )
    return modules
