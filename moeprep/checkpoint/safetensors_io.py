"""Minimal, validating safetensors reader and streaming writer.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length N, N bytes of
JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the
data region. Every offset is checked against the file size, so a truncated or hostile file raises a
``CheckpointError`` naming the file and tensor instead of crashing or reading garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from moeprep.checkpoint.pipeline import background_iter
from moeprep.errors import CheckpointError

FLOAT_DTYPES = ("BF16", "F16", "F32")  # unquantized weights
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
_ALIGN = 8
_CHUNK = 64 * 1024 * 1024
_HASH_SLICE = 8 * 1024 * 1024  # what sha256_file maps at a time
FLUSH_BYTES = 512 * 1024 * 1024  # written bytes between write-behind flushes
HASH_LAG = 1  # chunks whose output hash may still run when the writer takes the next chunk


def dtype_itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``begin``/``end`` are absolute byte offsets in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the file is corrupt or truncated, download or copy it again")


def read_header(path: Path) -> SafetensorsFile:
    """Parse and validate the header of ``path``; never reads tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"only {size} bytes, no header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _fail(path, f"header length {header_len} exceeds the file size {size}")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    tensors = {name: _parse_entry(path, name, entry, data_start, size) for name, entry in header.items()}
    _check_no_overlap(path, tensors.values())
    return SafetensorsFile(path, tensors, metadata, data_start)


def _parse_entry(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise _fail(path, f"tensor {name!r} ends at byte {end} but the file has {size}")
    expected = math.prod(shape) * dtype_itemsize(dtype)
    if end - begin != expected:
        raise _fail(path, f"tensor {name!r} has {end - begin} bytes, its shape {shape} {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_no_overlap(path: Path, infos: Iterable[TensorInfo]) -> None:
    last_end, last_name = 0, None
    for info in sorted(infos, key=lambda i: (i.begin, i.end)):
        if info.nbytes and info.begin < last_end:
            raise _fail(path, f"tensors {last_name!r} and {info.name!r} overlap")
        if info.nbytes:
            last_end, last_name = info.end, info.name


def read_bytes(path: Path, begin: int, length: int) -> bytearray:
    """Read exactly ``length`` bytes at ``begin`` (raises if the file got shorter)."""
    buf = bytearray(length)
    view = memoryview(buf)
    with Path(path).open("rb", buffering=0) as f:
        f.seek(begin)
        done = 0
        while done < length:
            n = f.readinto(view[done:])
            if not n:
                raise _fail(Path(path), f"unexpected end of file at byte {begin + done}")
            done += n
    return buf


def map_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """``info``'s bytes as a tensor over a private (copy-on-write) memory map of just that range: no
    read copy and no fresh zeroed buffer; the mapping goes away with the last reference to it."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
    with Path(path).open("rb") as f:
        if os.fstat(f.fileno()).st_size < info.end:
            raise _fail(Path(path), f"tensor {info.name!r} ends past the end of the file (it was truncated)")
        mapped = mmap.mmap(f.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, offset=info.begin - start, count=info.nbytes)
    return flat.view(info.torch_dtype).view(info.shape)


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Load one tensor into memory (a fresh, writable CPU tensor)."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    raw = read_bytes(path, info.begin, info.nbytes)
    return torch.frombuffer(raw, dtype=info.torch_dtype).view(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The contiguous storage bytes of ``tensor`` (no copy when already contiguous on CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_itemsize(self.dtype)


@dataclass(frozen=True)
class WrittenFile:
    """A written shard: ``header_sha256`` covers bytes before the data region, the tensor hashes the rest."""

    path: Path
    size: int
    header_sha256: str
    tensor_sha256: dict[str, str]
    tensor_offsets: dict[str, tuple[int, int]]


def encode_header(
    entries: list[TensorEntry], metadata: dict[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included, padded to 8) and each tensor's relative data offsets."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for e in entries:
        offsets[e.name] = (pos, pos + e.nbytes)
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets


TensorProducer = Callable[[TensorEntry], "torch.Tensor | Iterable[torch.Tensor]"]


def _tensor_chunks(entries: list[TensorEntry], produce: TensorProducer) -> Iterator[tuple[str, memoryview | None]]:
    """(tensor name, bytes) for every chunk of every entry, then (name, None) closing each tensor."""
    for entry in entries:
        produced = produce(entry)
        for chunk in [produced] if isinstance(produced, torch.Tensor) else produced:
            yield entry.name, tensor_bytes(chunk)
        yield entry.name, None


def write_safetensors(
    path: Path,
    entries: list[TensorEntry],
    produce: TensorProducer,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> WrittenFile:
    """Stream ``entries`` into ``path``: ``produce(entry)`` returns the tensor, or an iterable of
    chunks whose bytes concatenate to it (so huge tensors never sit in memory whole).

    Three stages overlap: chunks are produced in a background thread, and each chunk is hashed (per-tensor
    sha256) on a second thread while it is written here; the writer waits only when the hash falls more than
    ``HASH_LAG`` chunks behind. The header hash and the tensor hashes together cover every byte of the file,
    once."""
    header, rel_offsets = encode_header(entries, metadata)
    sizes = {e.name: e.nbytes for e in entries}
    tensor_hash, written = hashlib.sha256(), 0
    tensor_hashes: dict[str, str] = {}
    pending: deque[Future[None]] = deque()  # hashes of chunks written or being written, oldest first
    with (
        Path(path).open("wb") as f,
        ThreadPoolExecutor(1, thread_name_prefix="moeprep-hash") as hasher,
        WriteBehind(f) as behind,
    ):
        f.write(header)
        for name, data in background_iter(_tensor_chunks(entries, produce)):
            if data is None:
                if written != sizes[name]:
                    raise CheckpointError(f"{path}: tensor {name!r} produced {written} bytes, expected {sizes[name]}")
                _wait_all(pending)
                tensor_hashes[name] = tensor_hash.hexdigest()
                tensor_hash, written = hashlib.sha256(), 0
                continue
            pending.append(hasher.submit(tensor_hash.update, data))
            f.write(data)
            written += len(data)
            behind.wrote()
            while len(pending) > HASH_LAG:
                pending.popleft().result()
            if on_bytes:
                on_bytes(len(data))
        _wait_all(pending)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    abs_offsets = {n: (len(header) + b, len(header) + e) for n, (b, e) in rel_offsets.items()}
    return WrittenFile(Path(path), size, hashlib.sha256(header).hexdigest(), tensor_hashes, abs_offsets)


def _wait_all(futures: deque[Future[None]]) -> None:
    while futures:
        futures.popleft().result()


class WriteBehind:
    """Every FLUSH_BYTES written, make them durable and drop them from the page cache, on a thread of its own.
    Writing many GB into the page cache and syncing once at the end lets dirty and cached pages pile up,
    and the kernel then spends more time reclaiming them than the disk takes to write them (on the 2-core
    CI box: 3-4x the system time and half the throughput)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.flushed = f, 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeprep-flush")
        self._pending: Future[None] | None = None

    def wrote(self) -> None:
        """Call after each write."""
        if self.f.tell() - self.flushed < FLUSH_BYTES:
            return
        self.f.flush()
        end = self.f.tell()
        if self._pending:
            self._pending.result()
        self._pending = self._pool.submit(_sync_and_drop, self.f.fileno(), self.flushed, end)
        self.flushed = end

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        if self._pending and not exc[0]:
            self._pending.result()


def _sync_and_drop(fd: int, begin: int, end: int) -> None:
    os.fdatasync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """sha256 of a whole file, hashed straight from a read-only map in bounded slices: no read copy, and each
    slice leaves this process's memory once hashed (it stays in the page cache for other readers). Raises
    ``HashingStopped`` if ``stop`` gets set."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_SEQUENTIAL)
            for begin in range(0, size, _HASH_SLICE):
                if stop is not None and stop.is_set():
                    raise HashingStopped(path)
                length = min(_HASH_SLICE, size - begin)
                with memoryview(mapped)[begin : begin + length] as piece:
                    digest.update(piece)
                mapped.madvise(mmap.MADV_DONTNEED, begin, length)
    return digest.hexdigest()


class HashingStopped(Exception):
    """``sha256_file`` was asked to stop before the end of the file."""


class BackgroundFileHashes:
    """The sha256 of each of ``paths``, hashed on threads of their own from the moment this is made, so a
    conversion reading the same files never waits on their hashes (several files hash side by side: sha256
    is one sequential stream per file, about 1.2-1.7 GB/s per core). ``with``: stops what is left on exit."""

    def __init__(self, paths: Iterable[Path], workers: int) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="moeprep-source-hash")
        self._hashes = {Path(p).name: self._pool.submit(sha256_file, Path(p), self._stop) for p in paths}

    def __contains__(self, name: str) -> bool:
        return name in self._hashes

    def sha256(self, name: str) -> str:
        """The hash of file ``name`` (waits for it)."""
        return self._hashes[name].result()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundFileHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_ranges(path: Path, ranges: dict[str, tuple[int, int]]) -> dict[str, str]:
    """One sequential pass over ``path``: the sha256 of each named, non-overlapping ``[begin, end)``
    range. A range past the end of the file hashes what exists (and so mismatches)."""
    pending = sorted(ranges.items(), key=lambda item: item[1])
    hashes = {name: hashlib.sha256() for name in ranges}
    pos = 0
    with Path(path).open("rb", buffering=0) as f:
        while pending and (chunk := f.read(_CHUNK)):
            end = pos + len(chunk)
            view = memoryview(chunk)
            for name, (b, e) in pending:
                if b >= end:
                    break
                if e > pos:
                    hashes[name].update(view[max(b, pos) - pos : min(e, end) - pos])
            pending = [(n, r) for n, r in pending if r[1] > end]
            pos = end
    return {name: h.hexdigest() for name, h in hashes.items()}
