"""Integrity checks of a prepared folder against its manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from moeprep.checkpoint.hashing import hash_workers, sha256_file, sha256_tree_ranges
from moeprep.checkpoint.safetensors_io import SafetensorsFile, read_bytes, read_header
from moeprep.errors import VerificationError
from moeprep.schema.manifest import (
    MANIFEST_NAME,
    SEAL_NAME,
    FileRecord,
    TensorRecord,
    check_file_sizes,
    load_manifest,
)


@dataclass(frozen=True)
class VerifyReport:
    files: int
    tensors: int
    bytes: int


def verify_folder(folder: Path) -> VerifyReport:
    """Re-hash every file and every tensor, each byte hashed once; raise ``VerificationError`` naming
    the first mismatching tensor (or file, when the difference is outside tensor data)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    check_file_sizes(folder, manifest)
    present = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    extra = sorted(name for name in present if name not in (MANIFEST_NAME, SEAL_NAME, *manifest.files))
    if extra:
        raise VerificationError(f"{folder / extra[0]} is not recorded in {MANIFEST_NAME}; remove it or convert again")
    by_file: dict[str, dict[str, TensorRecord]] = {}
    for name, record in manifest.all_tensor_records():
        if record.file not in manifest.files:
            raise VerificationError(
                f"{MANIFEST_NAME}: tensor {name!r} lives in unrecorded file {record.file}; convert again"
            )
        by_file.setdefault(record.file, {})[name] = record
    for file, record in manifest.files.items():
        _verify_file(folder / file, record, by_file.get(file, {}))
    tensors = sum(len(records) for records in by_file.values())
    return VerifyReport(len(manifest.files), tensors, sum(r.size for r in manifest.files.values()))


def _verify_file(path: Path, record: FileRecord, tensors: dict[str, TensorRecord]) -> None:
    """A whole-file hash, or for a shard: its header hash, its tensors' hashes, and that they cover
    the data region exactly, so every byte is checked once."""
    if record.covers == "file":
        if sha256_file(path) != record.sha256:
            raise VerificationError(
                f"{path}: sha256 differs from {MANIFEST_NAME}; the file was modified, convert again"
            )
        return
    ranges = {name: (t.begin, t.end) for name, t in tensors.items()}
    header = read_header(path)
    _check_header(path, header, tensors, ranges)
    hashes = sha256_tree_ranges(path, ranges, hash_workers())
    for name in sorted(ranges, key=lambda n: ranges[n]):
        if hashes[name] != tensors[name].sha256_tree:
            raise VerificationError(
                f"{path}: tensor {name!r} bytes differ from {MANIFEST_NAME} (sha256 mismatch); convert again"
            )
    if hashlib.sha256(read_bytes(path, 0, header.data_start)).hexdigest() != record.sha256:
        raise VerificationError(f"{path}: header differs from {MANIFEST_NAME}; the file was modified, convert again")


def _check_header(
    path: Path, header: SafetensorsFile, tensors: dict[str, TensorRecord], ranges: dict[str, tuple[int, int]]
) -> None:
    """The shard holds exactly the manifest's tensors, where the manifest says, back to back to its end."""
    if set(header.tensors) != set(ranges):
        odd = sorted(set(header.tensors) ^ set(ranges))[0]
        raise VerificationError(f"{path}: tensor {odd!r} is in the file or the manifest but not both; convert again")
    position = header.data_start
    for name in sorted(ranges, key=lambda n: ranges[n]):
        info, record = header.tensors[name], tensors[name]
        stored = (record.begin, record.end, record.dtype, record.stored_shape)
        if (info.begin, info.end, info.dtype, list(info.shape)) != stored or info.begin != position:
            raise VerificationError(
                f"{path}: header entry of tensor {name!r} differs from {MANIFEST_NAME}; convert again"
            )
        position = info.end
    if position != path.stat().st_size:
        raise VerificationError(f"{path}: {path.stat().st_size - position} bytes after the last tensor; convert again")
