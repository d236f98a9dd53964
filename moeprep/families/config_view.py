"""One way to read a model's config.json, whichever tool saved it.

transformers renames config keys between releases and declares the old names as aliases in each config class's
``attribute_map`` (transformers 5.x saves Qwen3-MoE's ``num_experts`` as ``num_local_experts``, ``torch_dtype`` as
``dtype``); vLLM reads configs through those classes, so either name serves. ``ALIASES`` holds those maps for the
families moeprep supports (tests/test_config_view.py checks them against the installed transformers; importing
transformers here would cost every command seconds). Family modules read ``ConfigView``s: any alias answers for
its key, and a key that is absent under every name is a one-line ``UnsupportedModelError``, never a KeyError.
"""

from __future__ import annotations

import json
import math
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


# What the values of the keys moeprep reads must be; a value of another type or out of range is refused in one
# line before anything is planned. The upper bounds are far above any released model and keep a typo from
# planning billions of tensors.
LAYERS, EXPERTS, DIM = 2**16, 2**16, 2**24
POSITIVE_INTS: dict[str, int] = {
    "num_hidden_layers": LAYERS,
    "num_local_experts": EXPERTS,
    "num_experts": EXPERTS,
    "n_routed_experts": EXPERTS,
    "num_experts_per_tok": EXPERTS,
    "n_group": EXPERTS,
    "topk_group": EXPERTS,
    "moe_layer_freq": LAYERS,
    "interleave_moe_layer_step": LAYERS,
    "decoder_sparse_step": LAYERS,
    "hidden_size": DIM,
    "intermediate_size": DIM,
    "moe_intermediate_size": DIM,
    "shared_expert_intermediate_size": DIM,
    "intermediate_size_mlp": DIM,
    "vocab_size": DIM,
    "num_attention_heads": DIM,
    "num_key_value_heads": DIM,
    "kv_lora_rank": DIM,
    "qk_rope_head_dim": DIM,
    "qk_nope_head_dim": DIM,
    "v_head_dim": DIM,
}
NON_NEGATIVE_INTS: dict[str, int] = {
    "n_shared_experts": EXPERTS,
    "first_k_dense_replace": LAYERS,
    "num_nextn_predict_layers": LAYERS,
    "num_mtp_layers": LAYERS,
}
# null: queries not low-rank (DeepSeek), head size hidden / heads (Mixtral as transformers 5.x saves it)
OPTIONAL_POSITIVE_INTS: dict[str, int] = {"q_lora_rank": DIM, "head_dim": DIM}
NUMBERS = frozenset({"routed_scaling_factor", "swiglu_limit"})
BOOLS = frozenset({"norm_topk_prob", "tie_word_embeddings", "use_qk_norm", "attention_bias"})
STRINGS = frozenset({"model_type", "topk_method", "scoring_func", "torch_dtype", "dtype"})
INT_LISTS = frozenset({"mlp_only_layers", "moe_layers"})
STRING_LISTS = frozenset({"architectures"})


def checked_value(key: str, value: Any, model_type: object) -> Any:
    """``value`` if it is what ``key`` must hold, else a one-line ``UnsupportedModelError``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in POSITIVE_INTS:
        ok, want = is_int and 1 <= value <= POSITIVE_INTS[key], f"an integer from 1 to {POSITIVE_INTS[key]}"
    elif key in NON_NEGATIVE_INTS:
        ok, want = is_int and 0 <= value <= NON_NEGATIVE_INTS[key], f"an integer from 0 to {NON_NEGATIVE_INTS[key]}"
    elif key in OPTIONAL_POSITIVE_INTS:
        limit = OPTIONAL_POSITIVE_INTS[key]
        ok, want = value is None or (is_int and 1 <= value <= limit), f"null or an integer from 1 to {limit}"
    elif key in NUMBERS:
        ok = (is_int or isinstance(value, float)) and math.isfinite(value) and abs(value) < 2**53
        want = "a finite number"
    elif key in BOOLS:
        ok, want = isinstance(value, bool), "true or false"
    elif key in STRINGS:
        ok, want = isinstance(value, str), "a string"
    elif key in INT_LISTS:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = "a list of integers"
    elif key in STRING_LISTS:
        ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    else:
        return value
    if not ok:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UnsupportedModelError(
            f"config.json ({model_type if isinstance(model_type, str) else 'no model_type'}): {key} is {shown}, "
            f"expected {want}; fix it as the model's original config has it"
        )
    return value


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
                value = checked_value(name, self.raw[name], self.raw.get("model_type"))
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

    def with_value(self, key: str, value: Any) -> ConfigView:
        """This config with ``key`` (under every name it is stored as, else its own) set to ``value``."""
        names = [name for name in self._names.get(key, (key,)) if name in self.raw] or [key]
        return ConfigView({**self.raw, **dict.fromkeys(names, value)})

    def __len__(self) -> int:
        return len(self.raw)


def config_view(config: Mapping[str, Any]) -> ConfigView:
    return config if isinstance(config, ConfigView) else ConfigView(config)
