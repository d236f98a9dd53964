"""Page-cache state of checkpoint files, for benchmarks that compare two checkpoints in the same state.

``evict`` drops the files from the page cache (``fsync`` then ``posix_fadvise(DONTNEED)``, plus
``/proc/sys/vm/drop_caches`` where this process may write it); ``warm`` reads them fully; ``resident_fraction``
measures what is cached with ``mincore`` over a read-only mapping, so each state is checked, not assumed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterable
from pathlib import Path

READ_CHUNK = 64 * 1024 * 1024
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_LIBC.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_LIBC.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_MAP_FAILED = ctypes.c_void_p(-1).value


def checkpoint_files(folder: Path) -> list[Path]:
    """Every regular file of ``folder`` (weights, index, config, ...), recursively, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _resident_pages(path: Path) -> tuple[int, int]:
    """(resident, total) pages of ``path``."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(byte & 1 for byte in vector), pages
        finally:
            _LIBC.munmap(address, size)
    finally:
        os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """The share of the files' pages that are in the page cache (1.0 for no bytes at all)."""
    resident = total = 0
    for path in paths:
        r, t = _resident_pages(path)
        resident, total = resident + r, total + t
    return resident / total if total else 1.0


def _drop_all_caches() -> bool:
    """Drop the whole page cache where this process may (root outside a container); whether it did."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def evict(paths: Iterable[Path], tolerance: float = 0.01) -> float:
    """Drop the files from the page cache and check with ``mincore`` that at most ``tolerance`` of their pages
    stayed; returns the share that stayed."""
    paths = list(paths)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    left = resident_fraction(paths)
    if left > tolerance and _drop_all_caches():
        left = resident_fraction(paths)
    if left > tolerance:
        raise RuntimeError(f"{left:.1%} of the files stayed in the page cache after eviction")
    return left


def read_all(paths: Iterable[Path]) -> float:
    """Read every byte of the files through the page cache; the seconds it took."""
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def warm(paths: Iterable[Path], tolerance: float = 0.99) -> float:
    """Read the files fully and check that at least ``tolerance`` of their pages are cached; returns that share."""
    paths = list(paths)
    read_all(paths)
    cached = resident_fraction(paths)
    if cached < tolerance:
        raise RuntimeError(f"only {cached:.1%} of the files stayed in the page cache after reading them")
    return cached
