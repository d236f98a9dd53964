"""Atomic output folders and size-capped sharded safetensors writing.

Everything is written into a hidden temporary sibling of the destination and renamed into place
at the very end, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from moeprep.checkpoint.safetensors_io import TensorEntry, TensorProducer, WrittenFile, write_safetensors
from moeprep.errors import OutputError, option

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class AtomicFolder:
    """``with AtomicFolder(dest) as tmp:`` write into ``tmp``; on success ``tmp`` becomes ``dest``. ``inputs``:
    what the run reads, which ``dest`` may neither be nor contain (replacing it would delete them)."""

    def __init__(self, dest: Path, overwrite: bool = False, inputs: Sequence[Path] = ()) -> None:
        self.dest = Path(dest).absolute()
        self.tmp = self.dest.parent / f".{self.dest.name}.moeprep-partial"
        self.overwrite = overwrite
        self.inputs = inputs

    def __enter__(self) -> Path:
        check_output_spares(self.dest, self.inputs)
        if self.dest.exists() and not self.overwrite:
            raise OutputError(f"{self.dest} already exists; choose another output or pass {option('overwrite', True)}")
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"cannot create {self.tmp}: {exc.strerror or exc}") from exc
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise OutputError(
                    f"no space left on the device while writing {self.dest}; free space and retry"
                ) from exc
            return
        old = self.dest.parent / f".{self.dest.name}.moeprep-old"
        if self.dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.dest.parent)


def check_output_spares(dest: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that is, or holds, one of ``inputs``: writing it would replace what is read."""
    target = Path(dest).resolve()
    for path in inputs:
        resolved = Path(path).resolve()
        if resolved == target or target in resolved.parents:
            raise OutputError(
                f"the output {dest} would replace {path}, which this run reads; choose an output folder outside it"
            )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_shards(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Greedy split in order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards if shards[0] else []


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class ShardedWrite:
    files: dict[str, WrittenFile]  # file name -> what was written
    weight_map: dict[str, str]  # tensor name -> file name


def rank_file_name(rank: int, index: int) -> str:
    """A tensor-parallel rank's own shard: vLLM's loader skips it (the index does not list it)."""
    return f"model-rank-{rank}-part-{index + 1:05d}.safetensors"


def write_sharded(
    folder: Path,
    entries: list[TensorEntry],
    produce: TensorProducer,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    rank: int | None = None,
) -> ShardedWrite:
    """Write ``entries`` as ``model-XXXXX-of-YYYYY.safetensors`` plus the index json, or with ``rank`` as
    that rank's ``model-rank-R-part-XXXXX.safetensors`` (no index)."""
    shards = plan_shards(entries, max_shard_bytes)
    files: dict[str, WrittenFile] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = shard_file_name(i, len(shards)) if rank is None else rank_file_name(rank, i)
        files[name] = write_safetensors(folder / name, shard, produce, {"format": "pt"}, on_bytes)
        weight_map.update({e.name: name for e in shard})
    if rank is None:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        write_json(folder / INDEX_NAME, index)
    return ShardedWrite(files, weight_map)


def write_json(path: Path, data: object) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
