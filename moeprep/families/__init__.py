"""Model families; importing this package registers every family module."""

from moeprep.families import (  # noqa: F401
    deepseek_v3,
    glm4_moe,
    gpt_oss,
    llama4,
    mixtral,
    qwen2_moe,
    qwen3_moe,
)
from moeprep.families.base import Family, MoeSpec, TensorSpec, family_for_config, family_names, get_family

__all__ = ["Family", "MoeSpec", "TensorSpec", "family_for_config", "family_names", "get_family"]
