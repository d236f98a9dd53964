"""The same input and options give byte-identical output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import run_cli


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("family", "backend"), [("qwen2-moe", "none"), ("gpt-oss", "triton")])
def test_two_conversions_are_byte_identical(tiny, tmp_path: Path, family: str, backend: str) -> None:
    outputs = []
    for name in ("a", "b"):
        result = run_cli("convert", tiny(family), tmp_path / name, "--backend", backend, "--max-shard-size", "500KB")
        assert result.returncode == 0, result.stderr
        outputs.append(digest(tmp_path / name))
    assert outputs[0] == outputs[1]
    assert len([n for n in outputs[0] if n.endswith(".safetensors")]) >= 2
