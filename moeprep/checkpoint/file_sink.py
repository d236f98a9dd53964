"""Writing one file front to back at the disk's speed, with the bytes read (hashed) on their way out.

``open_sink(path)`` writes with O_DIRECT where the filesystem takes it, else through the page cache with
write-behind flushes; both give the same bytes. ``benchmarks/disk_write_modes.py``: on an H200 host's
disk (4 GB) write-behind 1.23 GB/s, O_DIRECT 2.08 GB/s; on the 2-core CI box (2 GB) 1.5 and 2.5 GB/s. The bytes
come as flat uint8 tensors on any device: chunks made on a GPU are copied straight into the (then pinned)
O_DIRECT buffers, at the bus's speed rather than through pageable memory.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

import torch

from moeprep.checkpoint.hashing import HashFeed

DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this
SLOT_BYTES = 16 * 1024 * 1024  # one O_DIRECT write
SLOTS = 8  # ring buffers: filling, being written and being hashed
FLUSH_BYTES = 512 * 1024 * 1024  # buffered: written bytes between write-behind flushes
BUFFERED_READ_LAG = 1  # buffered: writes whose hash may still run when the next one is written


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The contiguous storage of ``tensor`` as a flat uint8 tensor, on its own device."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def host_bytes(data: torch.Tensor) -> memoryview:
    """The bytes of a flat uint8 tensor in host memory (copied back from a GPU)."""
    return memoryview(data.cpu().numpy()) if data.numel() else memoryview(b"")


class FileSink(Protocol):
    def write(self, data: torch.Tensor, read: HashFeed) -> None:
        """Append ``data``; ``read`` is handed the bytes as stored (returns the tasks still reading them)."""

    def close(self) -> int:
        """Finish the file (durable on disk); returns its size."""

    def abort(self) -> None:
        """Stop on an error: wait for what is running, close the file (its removal is the caller's)."""


def open_sink(path: Path) -> FileSink:
    """A new file at ``path``, written with O_DIRECT where the filesystem supports it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = _direct_fd(path, flags)
    return DirectFile(fd) if fd is not None else BufferedFile(os.open(path, flags, 0o644))


def _direct_fd(path: Path, flags: int) -> int | None:
    """``path`` opened for O_DIRECT, tried with one aligned block at offset 0 (the file's first bytes overwrite
    it); None where the filesystem refuses either (tmpfs before Linux 6.6, some FUSE and network filesystems)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        fd = os.open(path, flags | direct, 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None
    try:
        with mmap.mmap(-1, DIRECT_ALIGN) as block:
            os.pwrite(fd, block, 0)
    except OSError as exc:
        os.close(fd)
        if exc.errno != errno.EINVAL:
            raise
        return None
    return fd


def _closed(fd: int) -> int:
    """Close ``fd`` unless it is already closed (-1); returns -1."""
    if fd >= 0:
        os.close(fd)
    return -1


def _wait_all(tasks: Iterable[Future[None]]) -> None:
    for task in tasks:
        task.result()


class DirectFile:
    """O_DIRECT writes from a ring of page-aligned buffers: bytes are copied into the ring (handed to ``read``
    there, so the caller's buffer is free at once), each full buffer is written by a thread of its own while
    the next fills, and a buffer is refilled once its write and its readers are done. The last buffer is
    written padded to the block size and the file truncated back to its length."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = mmap.mmap(-1, SLOTS * SLOT_BYTES)  # page-aligned, as O_DIRECT needs
        self._ring = torch.frombuffer(self._buffer, dtype=torch.uint8)
        self._slots = [self._ring[i * SLOT_BYTES : (i + 1) * SLOT_BYTES] for i in range(SLOTS)]
        self._views = [memoryview(slot.numpy()) for slot in self._slots]
        self._holds: list[list[Future[None]]] = [[] for _ in range(SLOTS)]
        self._writer = ThreadPoolExecutor(2, thread_name_prefix="moeprep-write")
        self._slot = self._filled = self._offset = 0  # current slot, bytes in it, file offset of its start
        self._pinned = False

    def write(self, data: torch.Tensor, read: HashFeed) -> None:
        if data.is_cuda and not self._pinned:
            self._pin()
        pos = 0
        while pos < len(data):
            if self._filled == 0:
                _wait_all(self._holds[self._slot])
                self._holds[self._slot] = []
            take = min(SLOT_BYTES - self._filled, len(data) - pos)
            self._slots[self._slot][self._filled : self._filled + take].copy_(data[pos : pos + take])
            self._holds[self._slot] += read(self._views[self._slot][self._filled : self._filled + take])
            self._filled += take
            pos += take
            if self._filled == SLOT_BYTES:
                self._write_slot(SLOT_BYTES)

    def _pin(self) -> None:
        """Page-lock the ring, so copies from the GPU land in it directly (undone on close)."""
        err = torch.cuda.cudart().cudaHostRegister(self._ring.data_ptr(), self._ring.numel(), 0)
        if err != 0:
            raise OSError(f"cudaHostRegister of the {self._ring.numel()}-byte write buffers failed (error {err})")
        self._pinned = True

    def _write_slot(self, length: int) -> None:
        view, offset = self._views[self._slot][:length], self._offset
        self._holds[self._slot].append(self._writer.submit(_pwrite_all, self._fd, view, offset))
        self._offset += self._filled
        self._slot, self._filled = (self._slot + 1) % SLOTS, 0

    def close(self) -> int:
        size = self._offset + self._filled
        if self._filled:
            padded = -(-self._filled // DIRECT_ALIGN) * DIRECT_ALIGN
            self._views[self._slot][self._filled : padded] = bytes(padded - self._filled)
            self._write_slot(padded)
        try:
            _wait_all(task for holds in self._holds for task in holds)
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        finally:
            self.abort()
        return size

    def abort(self) -> None:
        wait([task for holds in self._holds for task in holds])
        self._writer.shutdown(wait=True)
        self._holds = [[] for _ in range(SLOTS)]
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self._ring.data_ptr())
            self._pinned = False
        self._fd = _closed(self._fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class BufferedFile:
    """Writes through the page cache; every ``FLUSH_BYTES`` the written bytes are made durable and dropped
    from the page cache on a thread of its own. Syncing many GB once at the end lets dirty and cached pages
    pile up, and the kernel then spends more time reclaiming them than the disk takes to write them (on the
    2-core CI box: 3-4x the system time and half the throughput)."""

    def __init__(self, fd: int) -> None:
        self._fd, self._size, self._flushed = fd, 0, 0
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="moeprep-flush")
        self._flush: Future[None] | None = None
        self._reading: deque[list[Future[None]]] = deque()  # readers of the latest writes, oldest first

    def write(self, data: torch.Tensor, read: HashFeed) -> None:
        view = host_bytes(data)
        self._reading.append(read(view))
        _pwrite_all(self._fd, view, self._size)
        self._size += len(view)
        while len(self._reading) > BUFFERED_READ_LAG:
            _wait_all(self._reading.popleft())
        if self._size - self._flushed >= FLUSH_BYTES:
            if self._flush:
                self._flush.result()
            self._flush = self._flusher.submit(_sync_and_drop, self._fd, self._flushed, self._size)
            self._flushed = self._size

    def close(self) -> int:
        try:
            _wait_all(task for tasks in self._reading for task in tasks)
            if self._flush:
                self._flush.result()
            os.fsync(self._fd)
        finally:
            self.abort()
        return self._size

    def abort(self) -> None:
        wait([task for tasks in self._reading for task in tasks])
        self._reading.clear()
        self._flusher.shutdown(wait=True)
        self._fd = _closed(self._fd)


def _sync_and_drop(fd: int, begin: int, end: int) -> None:
    os.fdatasync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
