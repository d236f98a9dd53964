"""Property-based tests over what users hand to ``convert``: ``config.json`` values (wrong types, negatives,
zeros, huge numbers, missing keys) and index files. Planning and converting either succeed or raise one clean
one-line ``MoeprepError``, never anything else."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moeprep.convert import convert, load_plan
from moeprep.errors import MoeprepError
from moeprep.fixtures import build_fixture
from moeprep.plan import PlanOptions

DELETE = object()
FAMILIES = {  # family -> (backend, options) of the plan under test
    "gpt-oss": ("triton", PlanOptions(arch="sm90")),
    "deepseek-v3": ("none", PlanOptions(fuse_shared_replicas=1)),
    "qwen3-moe": ("none", PlanOptions()),
    "llama4": ("none", PlanOptions()),
}
ALIASES = ["num_local_experts", "n_routed_experts", "num_experts", "dtype", "torch_dtype", "num_nextn_predict_layers"]
numbers = st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2, 2**31, 2**63]) | st.floats(allow_nan=True)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
ROOT = Path(tempfile.mkdtemp(prefix="moeprep-fuzz-"))
SOURCES: dict[str, Path] = {}


def source(family: str) -> Path:
    """The family's tiny fixture, built once per session (hypothesis examples cannot use pytest fixtures)."""
    if family not in SOURCES:
        SOURCES[family] = build_fixture(family, ROOT / "sources" / family)
    return SOURCES[family]


def apply_edits(mapping: dict, edits: dict) -> None:
    """Set each key of ``edits`` to its value in ``mapping``, or remove it where the value is ``DELETE``."""
    for key, value in edits.items():
        if value is DELETE:
            mapping.pop(key, None)
        else:
            mapping[key] = value


def variant(family: str, config_edits: dict, index_edits: dict | None = None) -> Path:
    """A folder whose shards link to the fixture's, with ``config.json`` (and the index's weight map) edited."""
    src = source(family)
    folder = Path(tempfile.mkdtemp(dir=ROOT))
    for path in src.iterdir():
        (folder / path.name).symlink_to(path)
    config = json.loads((src / "config.json").read_text())
    apply_edits(config, config_edits)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    if index_edits is not None:
        index = json.loads((src / "model.safetensors.index.json").read_text())
        apply_edits(index["weight_map"], index_edits)
        (folder / "model.safetensors.index.json").unlink()
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def plan_or_clean_error(folder: Path, family: str, dest: Path | None = None) -> None:
    backend, options = FAMILIES[family]
    try:
        src, plan = load_plan(str(folder), backend, options=options)
        if dest is not None:
            convert(src, plan, dest)
    except MoeprepError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
    finally:
        shutil.rmtree(folder)
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)


def config_edits(family: str) -> st.SearchStrategy[dict]:
    keys = sorted(json.loads((source(family) / "config.json").read_text())) + ALIASES
    return st.dictionaries(st.sampled_from(keys), st.just(DELETE) | json_values, min_size=1, max_size=3)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_values_plan_or_fail_in_one_line(family: str) -> None:
    @FUZZ
    @given(config_edits(family))
    def check(edits: dict) -> None:
        plan_or_clean_error(variant(family, edits), family)

    check()


@pytest.mark.parametrize("family", ["gpt-oss", "deepseek-v3"])
def test_config_values_convert_or_fail_in_one_line(family: str) -> None:
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(config_edits(family))
    def check(edits: dict) -> None:
        plan_or_clean_error(variant(family, edits), family, ROOT / "out")

    check()


@pytest.mark.parametrize("family", ["gpt-oss", "qwen3-moe"])
def test_index_files_plan_or_fail_in_one_line(family: str) -> None:
    names = sorted(json.loads((source(family) / "model.safetensors.index.json").read_text())["weight_map"])
    files = st.sampled_from(["model-00001-of-00003.safetensors", "missing.safetensors", "../config.json", ""])
    edits = st.dictionaries(
        st.sampled_from(names) | st.text(max_size=20), st.just(DELETE) | files | json_values, min_size=1, max_size=3
    )

    @FUZZ
    @given(edits)
    @example({"lm_head.weight": "\n"})  # a file name with a newline, once quoted raw into a message
    def check(index_edits: dict) -> None:
        plan_or_clean_error(variant(family, {}, index_edits), family)

    check()


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"hidden_size": "128"}, 'hidden_size is "128", expected an integer from 1'),
        ({"num_local_experts": 2**40}, "num_local_experts is 1099511627776, expected an integer from 1 to 65536"),
        ({"num_hidden_layers": None}, "num_hidden_layers is null"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok is 0, expected an integer from 1"),
    ],
)
def test_a_wrong_config_value_is_named_with_what_it_should_be(edits: dict, message: str) -> None:
    folder = variant("gpt-oss", edits)
    with pytest.raises(MoeprepError, match=message.replace("(", r"\(")):
        load_plan(str(folder), "triton", options=PlanOptions(arch="sm90"))
