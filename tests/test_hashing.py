"""File sha256 and the tensors' sha256 tree: the tree computed in pieces on several lanes, from chunks of any
size, equals its one-go definition, and the verifier's parallel range hashes equal both."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from moeprep.checkpoint.hashing import (
    BackgroundFileHashes,
    HashingStopped,
    HashLanes,
    TreeHasher,
    hash_workers,
    sha256_file,
    sha256_tree,
    sha256_tree_ranges,
)
from tests.conftest import fresh_bytes


def test_sha256_tree_is_the_sha256_of_the_piece_digests() -> None:
    data = fresh_bytes(2500)
    pieces = [data[:1000], data[1000:2000], data[2000:]]
    expected = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()
    assert sha256_tree(data, piece_bytes=1000) == expected
    assert sha256_tree(b"", piece_bytes=1000) == hashlib.sha256(b"").hexdigest()
    assert sha256_tree(data, piece_bytes=1000) != sha256_tree(data, piece_bytes=500)
    assert sha256_tree(data[:999] + bytes([data[999] ^ 1]) + data[1000:], piece_bytes=1000) != expected


@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 7777])
def test_tree_hasher_in_random_chunks_equals_the_definition(lanes: int, size: int) -> None:
    rng = random.Random(size * 10 + lanes)
    data = memoryview(fresh_bytes(size))
    with HashLanes(lanes) as pool:
        hasher, pos = TreeHasher(pool, piece_bytes=1000), 0
        while pos < size:
            take = rng.choice([1, 7, 500, 999, 1000, 2500])
            hasher.update(data[pos : pos + take])
            pos += take
        assert hasher.hexdigest() == sha256_tree(data, piece_bytes=1000)


def test_tree_ranges_of_a_file(tmp_path: Path) -> None:
    data = fresh_bytes(10_500)
    (tmp_path / "f.bin").write_bytes(data)
    ranges = {"a": (0, 2048), "b": (2048, 2048), "c": (2048, 9000), "d": (9000, 10_500)}
    got = sha256_tree_ranges(tmp_path / "f.bin", ranges, workers=3, piece_bytes=1000)
    assert got == {n: sha256_tree(data[b:e], piece_bytes=1000) for n, (b, e) in ranges.items()}
    os.truncate(tmp_path / "f.bin", 10_000)  # a range past the end hashes what exists, and so mismatches
    assert sha256_tree_ranges(tmp_path / "f.bin", ranges, workers=3, piece_bytes=1000)["d"] != got["d"]


def test_hash_workers_scale_with_cores() -> None:
    assert [hash_workers(n) for n in (1, 2, 8, 16, 64)] == [1, 1, 2, 4, 4]


@pytest.mark.parametrize("size", [0, 1, 4096, (64 << 20) + 12345])  # empty, tiny, a page, many map slices
def test_sha256_file_equals_hashlib(tmp_path: Path, size: int) -> None:
    data = fresh_bytes(size)
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()


def test_background_hashes_are_the_file_hashes_and_stop_on_exit(tmp_path: Path) -> None:
    files = {tmp_path / f"f{i}.bin": fresh_bytes(random.Random(i).randrange(1, 3 << 20)) for i in range(5)}
    for path, data in files.items():
        path.write_bytes(data)
    with BackgroundFileHashes(files, workers=2) as hashes:
        assert {p: hashes.sha256(p.name) for p in files} == {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    big = tmp_path / "big.bin"
    big.write_bytes(fresh_bytes(1 << 20) * 256)  # 256 MiB: four slices
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashingStopped):
        sha256_file(big, stop)
    with BackgroundFileHashes([big], workers=1) as hashes:
        pass  # leaving the block stops the hash (the file would take a while) and does not wait for it
    with pytest.raises((HashingStopped, CancelledError)):
        hashes.sha256(big.name)
