"""Integrity checks of a prepared folder against its manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeprep.checkpoint.manifest import MANIFEST_NAME, TensorRecord, check_file_sizes, load_manifest
from moeprep.checkpoint.safetensors_io import read_header, sha256_file_and_ranges
from moeprep.errors import VerificationError


@dataclass(frozen=True)
class VerifyReport:
    files: int
    tensors: int
    bytes: int


def verify_folder(folder: Path) -> VerifyReport:
    """Re-hash every file and every tensor in one pass per file; raise ``VerificationError`` naming
    the first mismatching tensor (or file, when the difference is outside tensor data)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    check_file_sizes(folder, manifest)
    extra = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME and p.name not in manifest.files)
    if extra:
        raise VerificationError(f"{folder / extra[0]} is not recorded in {MANIFEST_NAME}; remove it or convert again")
    by_file: dict[str, dict[str, tuple[int, int]]] = {}
    for name, record in manifest.tensors.items():
        if record.file not in manifest.files:
            raise VerificationError(
                f"{MANIFEST_NAME}: tensor {name!r} lives in unrecorded file {record.file}; convert again"
            )
        by_file.setdefault(record.file, {})[name] = (record.begin, record.end)
    for file, record in manifest.files.items():
        path = folder / file
        ranges = by_file.get(file, {})
        file_sha, tensor_sha = sha256_file_and_ranges(path, ranges)
        for name in sorted(ranges, key=lambda n: ranges[n]):
            if tensor_sha[name] != manifest.tensors[name].sha256:
                raise VerificationError(
                    f"{path}: tensor {name!r} bytes differ from {MANIFEST_NAME} (sha256 mismatch); convert again"
                )
        if file_sha != record.sha256:
            raise VerificationError(
                f"{path}: sha256 differs from {MANIFEST_NAME}; the file was modified, convert again"
            )
        if ranges:
            _check_header(path, manifest.tensors, ranges)
    return VerifyReport(len(manifest.files), len(manifest.tensors), sum(r.size for r in manifest.files.values()))


def _check_header(path: Path, tensors: dict[str, TensorRecord], ranges: dict[str, tuple[int, int]]) -> None:
    header = read_header(path)
    for name in ranges:
        info, record = header.tensors.get(name), tensors[name]
        stored = (record.begin, record.end, record.dtype, record.stored_shape)
        if info is None or (info.begin, info.end, info.dtype, list(info.shape)) != stored:
            raise VerificationError(
                f"{path}: header entry of tensor {name!r} differs from {MANIFEST_NAME}; convert again"
            )
