"""Property-based tests: parsers of untrusted files raise only clean MoeprepErrors, never hang."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeprep.checkpoint.safetensors_io import read_header
from moeprep.errors import CheckpointError, LoraError, ManifestError
from moeprep.lora.adapter import parse_adapter_config
from moeprep.schema.manifest import SCHEMA_VERSION, Manifest

FUZZ = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "BF16", "U8", "F8_E4M3", "Q4", ""]) | json_values,
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-5, 2**62), max_size=3) | json_values,
    },
)


def parse(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        try:
            read_header(path)
        except CheckpointError:
            pass


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_never_crash_the_header_parser(raw: bytes) -> None:
    parse(raw)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5), st.binary(max_size=64), st.integers(-8, 8)
)
def test_structured_headers_never_crash_the_parser(header: dict, data: bytes, length_skew: int) -> None:
    raw = json.dumps(header).encode()
    parse(struct.pack("<Q", max(0, len(raw) + length_skew)) + raw + data)


manifest_like = st.fixed_dictionaries(
    {"schema_version": st.just(SCHEMA_VERSION) | json_values},
    optional={
        "moeprep_version": json_values,
        "model_type": json_values,
        "architectures": json_values,
        "source": st.fixed_dictionaries(
            {}, optional={"kind": json_values, "location": json_values, "revision": json_values, "files": json_values}
        )
        | json_values,
        "target": st.dictionaries(
            st.sampled_from(["backend", "recipe", "recipe_version", "vllm_versions", "tp_size", "bogus"]), json_values
        )
        | json_values,
        "files": st.dictionaries(
            st.text(max_size=8),
            st.fixed_dictionaries({}, optional={"size": json_values, "sha256": json_values, "covers": json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
        "tensors": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
        "routing": json_values,
        "lora": json_values,
    },
)


@FUZZ
@given(manifest_like | json_values)
def test_manifest_parsing_raises_only_manifest_errors(data: object) -> None:
    try:
        Manifest.from_dict(data)
    except ManifestError:
        pass


adapter_config_like = st.fixed_dictionaries(
    {},
    optional={
        "peft_type": st.sampled_from(["LORA", "IA3"]) | json_values,
        "r": st.integers(-2, 64) | json_values,
        "lora_alpha": st.integers(-2, 64) | st.floats() | json_values,
        "use_rslora": st.booleans() | json_values,
        "use_dora": st.booleans() | json_values,
        "bias": st.sampled_from(["none", "all"]) | json_values,
        "target_modules": st.lists(st.text(max_size=8), max_size=3) | json_values,
        "target_parameters": st.lists(st.text(max_size=8), max_size=3) | json_values,
        "rank_pattern": st.dictionaries(st.text(max_size=6), st.integers(-2, 16) | json_values, max_size=3)
        | json_values,
        "alpha_pattern": st.dictionaries(st.text(max_size=6), st.floats() | json_values, max_size=3) | json_values,
    },
)


@FUZZ
@given(adapter_config_like | json_values, st.text(max_size=30))
def test_adapter_config_parsing_raises_only_lora_errors(data: object, key: str) -> None:
    try:
        config = parse_adapter_config(data, "adapter_config.json")
    except LoraError:
        return
    assert config.r > 0
    scaling = config.scaling(key)  # patterns that parsed also apply to any module name
    assert isinstance(scaling, float)
