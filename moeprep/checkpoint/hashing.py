"""sha256 of files and of tensors.

Whole files get their plain sha256 (what the Hub records for a file). Tensors get the **sha256 tree**: the
sha256 of the concatenated 32-byte sha256 digests of their consecutive ``TREE_PIECE_BYTES`` pieces (the last
piece may be shorter; an empty tensor has no pieces). sha256 is one sequential stream, about 1.2 GB/s per
core on the H200 hosts, slower than their disk; the pieces of one tensor hash on several cores side by side.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

TREE_PIECE_BYTES = 16 * 1024 * 1024
_FILE_SLICE = 8 * 1024 * 1024  # what sha256_file maps at a time
HashFeed = Callable[[memoryview], list[Future[None]]]  # takes bytes to hash, returns the tasks reading them


def hash_workers(cpus: int | None = None) -> int:
    """Threads to hash tensor pieces on: a core in four, at most four (more would outrun the disk)."""
    return max(1, min(4, (cpus or os.cpu_count() or 1) // 4))


def sha256_tree(data: bytes | memoryview, piece_bytes: int = TREE_PIECE_BYTES) -> str:
    """The sha256 tree of ``data`` in one go (the definition; ``TreeHasher`` computes the same in pieces)."""
    view = memoryview(data).cast("B")
    return _tree_root(hashlib.sha256(view[i : i + piece_bytes]).digest() for i in range(0, len(view), piece_bytes))


def _tree_root(piece_digests: Iterable[bytes]) -> str:
    """The sha256 tree's digest from its pieces' digests, in order."""
    return hashlib.sha256(b"".join(piece_digests)).hexdigest()


class HashLanes:
    """A few single-thread executors; tasks on one lane run in the order they were given."""

    def __init__(self, lanes: int) -> None:
        self._lanes = [ThreadPoolExecutor(1, thread_name_prefix="moeprep-hash") for _ in range(max(1, lanes))]
        self._next = itertools.cycle(self._lanes)

    def next_lane(self) -> ThreadPoolExecutor:
        return next(self._next)

    def close(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True)

    def __enter__(self) -> HashLanes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TreeHasher:
    """The sha256 tree of one byte stream fed in order by ``update``. Each piece is hashed on one lane (in
    order), the next piece on the next lane, so a long tensor keeps every lane busy."""

    def __init__(self, lanes: HashLanes, piece_bytes: int = TREE_PIECE_BYTES) -> None:
        self._lanes, self._piece_bytes = lanes, piece_bytes
        self._digests: list[Future[bytes]] = []
        self._piece: Any = None  # the open piece's hash object
        self._lane: ThreadPoolExecutor | None = None
        self._filled = 0

    def update(self, data: memoryview) -> list[Future[None]]:
        """Feed the next bytes; returns the tasks that read ``data`` (keep its memory until they are done)."""
        tasks: list[Future[None]] = []
        pos = 0
        while pos < len(data):
            if self._piece is None:
                self._piece, self._lane, self._filled = hashlib.sha256(), self._lanes.next_lane(), 0
            assert self._lane is not None
            take = min(self._piece_bytes - self._filled, len(data) - pos)
            tasks.append(self._lane.submit(self._piece.update, data[pos : pos + take]))
            self._filled += take
            pos += take
            if self._filled == self._piece_bytes:
                self._close_piece()
        return tasks

    def _close_piece(self) -> None:
        assert self._lane is not None
        self._digests.append(self._lane.submit(self._piece.digest))
        self._piece = self._lane = None

    def hexdigest(self) -> str:
        """The tree's digest once every piece is hashed (waits for them)."""
        if self._piece is not None:
            self._close_piece()
        return _tree_root(f.result() for f in self._digests)


def sha256_tree_ranges(
    path: Path, ranges: dict[str, tuple[int, int]], workers: int, piece_bytes: int = TREE_PIECE_BYTES
) -> dict[str, str]:
    """The sha256 tree of each named ``[begin, end)`` range of ``path``, pieces read and hashed on ``workers``
    threads side by side. A range past the end of the file hashes what exists (and so mismatches)."""

    buffers = threading.local()  # one reused read buffer per thread: fresh ones cost a page fault per page

    def piece_digest(fd: int, begin: int, length: int) -> bytes:
        if not hasattr(buffers, "view"):
            buffers.view = memoryview(bytearray(piece_bytes))
        got = os.preadv(fd, [buffers.view[:length]], begin)
        return hashlib.sha256(buffers.view[:got]).digest()

    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="moeprep-verify") as pool:
            pieces = {
                name: [
                    pool.submit(piece_digest, fd, offset, min(piece_bytes, end - offset))
                    for offset in range(begin, end, piece_bytes)
                ]
                for name, (begin, end) in ranges.items()
            }
            return {name: _tree_root(f.result() for f in fs) for name, fs in pieces.items()}
    finally:
        os.close(fd)


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
            for begin in range(0, size, _FILE_SLICE):
                if stop is not None and stop.is_set():
                    raise HashingStopped(path)
                length = min(_FILE_SLICE, size - begin)
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
