"""The core shared by converter and plugin: JSON read into typed dataclasses, and the routing contract."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from moeprep.schema.routing import FusedSharedExperts, fused_shared_experts, routing_json
from moeprep.schema.typed_json import FieldTypeError, from_json
from tests.conftest import rewrite_manifest, run_cli


@dataclasses.dataclass
class Inner:
    count: int
    names: tuple[str, ...] = ()


@dataclasses.dataclass
class Outer:
    inner: Inner
    scale: float
    by_name: dict[str, Inner]
    note: str | None = None


def test_nested_dataclasses_are_built_and_checked_field_by_field() -> None:
    data = {"inner": {"count": 2, "names": ["a"]}, "scale": 1, "by_name": {"x": {"count": 0}}}
    assert from_json(Outer, data, "o") == Outer(Inner(2, ("a",)), 1, {"x": Inner(0)})
    wrong = [
        ({**data, "scale": "1"}, "o.scale has the wrong type"),
        ({**data, "inner": {"count": True}}, "o.inner.count has the wrong type"),  # a bool is not an int
        ({**data, "by_name": {"x": {"count": 1, "extra": 0}}}, "o.by_name.x has unknown field 'extra'"),
        ({"scale": 1.0, "by_name": {}}, "o has no field 'inner'"),
        ({**data, "inner": {"count": 1, "names": "ab"}}, "o.inner.names is not a list"),
        ({**data, "note": 3}, "o.note has the wrong type"),
    ]
    for value, message in wrong:
        with pytest.raises(FieldTypeError, match=message):
            from_json(Outer, value, "o")


def test_a_type_it_cannot_check_is_a_programming_error() -> None:
    @dataclasses.dataclass
    class Odd:
        path: Path

    with pytest.raises(NotImplementedError, match="cannot check"):
        from_json(Odd, {"path": "x"}, "odd")


def test_the_routing_contract_round_trips_and_checks_itself() -> None:
    contract = FusedSharedExperts.of(8, 2, 3, top_k=2, expert_intermediate=64, gated=True, mtp_layers=(4,))
    assert contract.slot_ids == ((8, 9, 10), (11, 12, 13)) and contract.num_experts == 14 and contract.gated
    assert fused_shared_experts(routing_json(contract)) == contract
    data = contract.to_json()
    assert "routed_ids" not in data and data["slot_ids"] == [[8, 9, 10], [11, 12, 13]]
    broken = [
        ({"slot_ids": [[8, 9, 10], [11, 12, 12]]}, "do not name every expert"),
        ({"num_experts": 15}, "num_experts is not"),
        ({"shared_gate_row": None}, "shared_gate_row"),
        ({"version": 2}, "version 2"),
        ({"slot_ids": [[8, 9], [10, 11]]}, r"slot_ids is not \[2\]\[3\]"),
    ]
    for change, message in broken:
        with pytest.raises(FieldTypeError, match=message):
            FusedSharedExperts.from_json({**data, **change})


def test_a_manifest_with_a_broken_routing_contract_is_refused_in_one_line(tiny, tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    assert run_cli("convert", tiny("qwen2-moe"), fused, "--fuse-shared-experts").returncode == 0
    copy = shutil.copytree(fused, tmp_path / "copy")
    rewrite_manifest(copy, lambda m: m["routing"]["fused_shared_experts"].update(replicas=2))
    result = run_cli("inspect", copy)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "malformed manifest (routing contract: num_experts is not" in result.stderr
