"""Both file sinks write exactly the bytes given and hand each byte to the reader once, in order; the O_DIRECT
ring never refills a buffer while a reader still reads it; a filesystem without O_DIRECT gets buffered writes."""

from __future__ import annotations

import errno
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from moeprep.checkpoint import file_sink
from moeprep.checkpoint.file_sink import BufferedFile, DirectFile, FileSink, open_sink
from tests.conftest import fresh_bytes

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


@pytest.fixture
def small_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ring buffers of two blocks, three of them: every few writes wrap the ring."""
    monkeypatch.setattr(file_sink, "SLOT_BYTES", 2 * file_sink.DIRECT_ALIGN)
    monkeypatch.setattr(file_sink, "SLOTS", 3)
    monkeypatch.setattr(file_sink, "FLUSH_BYTES", 10_000)


def direct_file(path: Path) -> DirectFile:
    try:
        return DirectFile(os.open(path, FLAGS | getattr(os, "O_DIRECT", 0), 0o644))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        pytest.skip(f"{path.parent}: this filesystem does not take O_DIRECT")


def make_sink(kind: str, path: Path) -> FileSink:
    return direct_file(path) if kind == "direct" else BufferedFile(os.open(path, FLAGS, 0o644))


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def write_pieces(sink: FileSink, pieces: list[bytes], slow_reader: bool) -> bytes:
    """Write ``pieces``; returns what the reader saw, read late (after a sleep) when ``slow_reader``."""
    seen: list[Future[bytes]] = []
    with ThreadPoolExecutor(2) as readers:

        def read(view: memoryview) -> list[Future[None]]:
            def copy() -> bytes:
                if slow_reader:
                    time.sleep(0.002)
                return bytes(view)

            seen.append(readers.submit(copy))
            return [seen[-1]]  # type: ignore[list-item]

        for piece in pieces:
            sink.write(as_tensor(piece), read)
        size = sink.close()
    assert size == sum(map(len, pieces))
    return b"".join(f.result() for f in seen)


@pytest.mark.parametrize("kind", ["direct", "buffered"])
@pytest.mark.parametrize("seed", range(4))
def test_sink_writes_the_bytes_and_the_reader_sees_them(tmp_path: Path, small_ring: None, kind: str, seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 8, 4095, 4096, 4097, 8192, 20_000]) for _ in range(12)]
    pieces = [rng.randbytes(n) for n in sizes]
    path = tmp_path / "f.bin"
    seen = write_pieces(make_sink(kind, path), pieces, slow_reader=seed % 2 == 1)
    assert path.read_bytes() == b"".join(pieces)
    assert seen == b"".join(pieces)


@pytest.mark.parametrize("kind", ["direct", "buffered"])
def test_empty_file(tmp_path: Path, kind: str) -> None:
    assert make_sink(kind, tmp_path / "f.bin").close() == 0
    assert (tmp_path / "f.bin").read_bytes() == b""


def test_without_o_direct_the_writes_are_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: Path, flags: int, mode: int = 0o777) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", no_direct)
    assert_buffered_sink_writes(tmp_path / "f.bin")


def test_o_direct_writes_refused_after_open_are_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite, refused = os.pwrite, []

    def refuse_first(fd: int, data: memoryview, offset: int) -> int:
        if not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_first)
    assert_buffered_sink_writes(tmp_path / "f.bin")
    assert refused


def assert_buffered_sink_writes(path: Path) -> None:
    sink = open_sink(path)
    assert isinstance(sink, BufferedFile)
    sink.write(as_tensor(b"abc"), lambda _: [])
    assert sink.close() == 3 and path.read_bytes() == b"abc"


def test_o_direct_is_used_where_the_filesystem_takes_it(tmp_path: Path) -> None:
    direct_file(tmp_path / "probe.bin").abort()  # skips where this filesystem refuses O_DIRECT
    sink = open_sink(tmp_path / "f.bin")
    assert isinstance(sink, DirectFile)
    sink.write(as_tensor(b"xyz"), lambda _: [])
    assert sink.close() == 3 and (tmp_path / "f.bin").read_bytes() == b"xyz"


def test_other_open_errors_are_raised(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_sink(tmp_path / "missing" / "f.bin")


@pytest.mark.parametrize("kind", ["direct", "buffered"])
def test_abort_closes_the_file(tmp_path: Path, small_ring: None, kind: str) -> None:
    sink = make_sink(kind, tmp_path / "f.bin")
    sink.write(as_tensor(fresh_bytes(10_000)), lambda _: [])
    sink.abort()
    fd = sink._fd  # type: ignore[union-attr]
    assert fd == -1
