"""The safetensors reader/writer against the reference ``safetensors`` library."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprep.checkpoint.hashing import sha256_tree, sha256_tree_ranges
from moeprep.checkpoint.safetensors_io import (
    DTYPE_NAMES,
    TensorEntry,
    read_header,
    read_tensor,
    write_safetensors,
)
from moeprep.checkpoint.source import open_local
from moeprep.errors import CheckpointError


def random_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "f32": torch.randn(3, generator=g),
        "u8": torch.randint(0, 256, (4, 3, 2), generator=g, dtype=torch.uint8),
        "fp8": torch.randn(6, 2, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
    }


def test_reads_files_written_by_safetensors(tmp_path: Path) -> None:
    tensors = random_tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "a.safetensors")
    assert header.metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        got = read_tensor(tmp_path / "a.safetensors", header.tensors[name])
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_written_files_load_in_safetensors_and_hashes_match(tmp_path: Path) -> None:
    tensors = random_tensors()
    entries = [TensorEntry(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    path = tmp_path / "b.safetensors"
    written = write_safetensors(path, entries, lambda e: tensors[e.name], {"k": "v"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].float(), tensor.float())
    raw = path.read_bytes()
    assert written.tensor_sha256_tree == {n: sha256_tree(raw[b:e]) for n, (b, e) in written.tensor_offsets.items()}
    assert sha256_tree_ranges(path, written.tensor_offsets, workers=2) == written.tensor_sha256_tree
    data_start = min(b for b, _ in written.tensor_offsets.values())
    assert hashlib.sha256(raw[:data_start]).hexdigest() == written.header_sha256
    assert written.size == len(raw)


def test_chunked_producer_writes_the_concatenation(tmp_path: Path) -> None:
    full = torch.randn(6, 4).to(torch.bfloat16)
    entry = TensorEntry("w", "BF16", (6, 4))
    write_safetensors(tmp_path / "c.safetensors", [entry], lambda e: iter([full[:2], full[2:5], full[5:]]))
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], full)


def test_producer_with_wrong_size_is_refused(tmp_path: Path) -> None:
    entry = TensorEntry("w", "BF16", (6, 4))
    with pytest.raises(CheckpointError, match="'w' produced 32 bytes, expected 48"):
        write_safetensors(tmp_path / "d.safetensors", [entry], lambda e: torch.zeros(4, 4, dtype=torch.bfloat16))


def _raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "ends at byte"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_corrupt_headers_raise_checkpoint_error(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_truncated_and_oversized_header_length(tmp_path: Path) -> None:
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="no header"):
        read_header(tmp_path / "short.safetensors")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        read_header(tmp_path / "long.safetensors")


def test_source_hashes_its_weight_files_while_converting(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(64, 33) for i in range(5)}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    source = open_local(tmp_path)
    expected = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    with source.hashing_weight_files():
        source.read_rows("t3", 10, 64)
        assert source.file_sha256("model.safetensors") == expected
    assert source.file_sha256("model.safetensors") == expected  # outside the block: hashed on the spot
    assert source.file_sha256("config.json") == hashlib.sha256(b"{}").hexdigest()
