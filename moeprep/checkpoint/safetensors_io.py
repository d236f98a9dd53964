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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moeprep.checkpoint.file_sink import flat_bytes, open_sink
from moeprep.checkpoint.hashing import HashLanes, TreeHasher, hash_workers
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
    """A written shard: ``header_sha256`` covers bytes before the data region, the tensors' sha256 trees
    the rest."""

    path: Path
    size: int
    header_sha256: str
    tensor_sha256_tree: dict[str, str]
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


def _tensor_chunks(entries: list[TensorEntry], produce: TensorProducer) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(tensor name, flat bytes on the chunk's device) for every chunk of every entry, then (name, None)
    closing each tensor."""
    for entry in entries:
        produced = produce(entry)
        for chunk in [produced] if isinstance(produced, torch.Tensor) else produced:
            yield entry.name, flat_bytes(chunk)
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

    Chunks are produced in a background thread; each is written here (``file_sink``) and its bytes hashed
    on their way out, the pieces of each tensor's sha256 tree on ``hash_workers()`` threads side by side.
    The header hash and the tensor hashes together cover every byte of the file, once."""
    header, rel_offsets = encode_header(entries, metadata)
    sizes = {e.name: e.nbytes for e in entries}
    hashers: dict[str, TreeHasher] = {}
    written = 0
    with HashLanes(hash_workers()) as lanes:
        sink = open_sink(Path(path))
        try:
            sink.write(torch.frombuffer(bytearray(header), dtype=torch.uint8), lambda _: [])
            for name, data in background_iter(_tensor_chunks(entries, produce)):
                if name not in hashers:  # the tensor's first chunk (or its end, when it is empty)
                    hashers[name] = TreeHasher(lanes)
                if data is None:
                    if written != sizes[name]:
                        raise CheckpointError(f"{path}: {name!r} produced {written} bytes, expected {sizes[name]}")
                    written = 0
                    continue
                sink.write(data, hashers[name].update)
                written += len(data)
                if on_bytes:
                    on_bytes(len(data))
            size = sink.close()
        except BaseException:
            sink.abort()
            raise
        tensor_hashes = {name: hasher.hexdigest() for name, hasher in hashers.items()}
    abs_offsets = {n: (len(header) + b, len(header) + e) for n, (b, e) in rel_offsets.items()}
    return WrittenFile(Path(path), size, hashlib.sha256(header).hexdigest(), tensor_hashes, abs_offsets)
