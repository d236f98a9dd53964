"""One way to read a model's config.json, whichever tool saved it.

transformers renames config keys between releases and declares the old names as aliases in each config class's
``attribute_map`` (transformers 5.x saves Qwen3-MoE's ``num_experts`` as ``num_local_experts``, ``torch_dtype`` as
``dtype``); vLLM reads configs through those classes, so either name serves. ``ALIASES`` holds those maps for the
families moeprep supports (tests/test_config_view.py checks them against the installed transformers; importing
transformers here would cost every command seconds). Family modules read ``ConfigView``s: any alias answers for
its key, and a key that is absent under every name is a one-line ``UnsupportedModelError``, never a KeyError.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from moeprep.errors import UnsupportedModelError

# Keys that name the same value in every config
COMMON_ALIASES: tuple[tuple[str, ...], ...] = (("torch_dtype", "dtype"),)
# Per model_type: (the name moeprep reads, the other names transformers' config class maps to it or from it)
ALIASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "qwen3_moe": (("num_experts", "num_local_experts"),),
    "gpt_oss": (("num_local_experts", "num_experts"),),
    "mixtral": (("num_local_experts", "num_experts"),),
    "deepseek_v3": (("n_routed_experts", "num_local_experts"), ("num_nextn_predict_layers", "num_mtp_layers")),
    "glm4_moe": (("n_routed_experts", "num_local_experts"), ("num_nextn_predict_layers", "num_mtp_layers")),
}


class MissingConfigKey(UnsupportedModelError, KeyError):
    """A key the family needs is absent under all its names (a KeyError too, so ``.get`` returns its default)."""

    def __str__(self) -> str:
        return str(self.args[0])


class ConfigView(Mapping[str, Any]):
    """A config dict (read-only) in which every alias of a key answers for it; nested configs that carry their
    own ``model_type`` (Llama 4's ``text_config``) are views too."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        model_type = raw.get("model_type")
        groups = (*COMMON_ALIASES, *ALIASES.get(model_type if isinstance(model_type, str) else "", ()))
        self._names = {key: group for group in groups for key in group}

    def __getitem__(self, key: str) -> Any:
        for name in self._names.get(key, (key,)):
            if name in self.raw:
                value = self.raw[name]
                return ConfigView(value) if isinstance(value, Mapping) and "model_type" in value else value
        names = " / ".join(repr(n) for n in self._names.get(key, (key,)))
        raise MissingConfigKey(
            f"config.json ({self.raw.get('model_type', 'no model_type')}) has no {names}; "
            "it is needed to read this checkpoint: add it as the model's original config has it"
        )

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(name in self.raw for name in self._names.get(key, (key,)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


def config_view(config: Mapping[str, Any]) -> ConfigView:
    return config if isinstance(config, ConfigView) else ConfigView(config)
