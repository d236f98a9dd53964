"""Model families; importing this package registers every family module, then finds them by name."""

from typing import Any

from moeprep.errors import UnsupportedModelError
from moeprep.families import (  # noqa: F401  (each registers itself)
    deepseek_v3,
    glm4_moe,
    gpt_oss,
    llama4,
    mixtral,
    qwen2_moe,
    qwen3_moe,
)
from moeprep.families.base import REGISTERED, Family, MoeSpec
from moeprep.families.tensor_spec import TensorSpec

__all__ = ["Family", "MoeSpec", "TensorSpec", "family_for_config", "family_names", "get_family"]


def get_family(key: str) -> Family:
    """The family for a CLI name or a config ``model_type``."""
    if key not in REGISTERED:
        raise UnsupportedModelError(
            f"unknown model family or model_type {key!r}; supported: {', '.join(family_names())}"
        )
    return REGISTERED[key]


def family_names() -> list[str]:
    return sorted({f.name for f in REGISTERED.values()})


def family_for_config(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UnsupportedModelError("config.json has no model_type; is this a Hugging Face model folder?")
    return get_family(model_type)
