"""Read a Hugging Face model folder or Hub repo lazily: config, aux files and tensors on demand.

Never unpickles arbitrary objects (``.bin`` only through ``torch.load(weights_only=True)``) and
never runs remote code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from moeprep.checkpoint.hashing import BackgroundFileHashes, sha256_file
from moeprep.checkpoint.safetensors_io import (
    DTYPE_NAMES,
    SafetensorsFile,
    TensorInfo,
    map_tensor,
    read_header,
    read_tensor,
)
from moeprep.errors import CheckpointError, option

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Weight files (any format) and their indexes: read as tensors, or another copy of the weights; never carried.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.ot",
    "*.npz",
)
PREPARED_NAMES = ("config.json", "moeprep.json", "moeprep.seal.json")  # written by moeprep itself
SOURCE_README = "README.source.md"  # the source's README.md (README.md is the prepared folder's model card)


def is_weight_file(name: str) -> bool:
    return any(fnmatch(name.rsplit("/", 1)[-1], pattern) for pattern in WEIGHT_PATTERNS)


def carried_files(names: list[str]) -> tuple[list[str], list[str]]:
    """Of a model folder's files (relative posix paths): (those carried into the prepared folder byte for byte,
    the sub-folders left out). Every file that is not a weight file is carried, in sub-folders too, except
    hidden paths (``.git``, ``.cache``) and the files moeprep writes itself; a sub-folder that holds a weight
    file is another copy of the model (gpt-oss's ``original/``, ``metal/``) and is left out whole."""
    visible = sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))
    weight_folders = {name.rsplit("/", 1)[0] for name in visible if "/" in name and is_weight_file(name)}
    left_out = sorted(f for f in weight_folders if not any(f.startswith(f"{other}/") for other in weight_folders))

    def keep(name: str) -> bool:
        in_left_out = any(name.startswith(f"{folder}/") for folder in left_out)
        return not (is_weight_file(name) or name in PREPARED_NAMES or in_left_out)

    return [name for name in visible if keep(name)], left_out


def folder_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def carried_name(name: str) -> str:
    """Where a carried source file lands in the prepared folder."""
    return SOURCE_README if name == "README.md" else name


@dataclass(frozen=True)
class HubSnapshot:
    """A Hub repo at one commit: what it holds, listed once per conversion."""

    repo_id: str
    commit: str
    files: tuple[str, ...]


@dataclass
class CheckpointSource:
    """A model folder: its config, aux files and a lazily read tensor table."""

    folder: Path
    kind: str  # "local" | "hub"
    location: str
    revision: str | None
    config: dict[str, Any]
    weight_files: list[str]
    aux_files: list[str]  # every non-weight file, carried (``carried_files``)
    left_out_folders: list[str] = field(default_factory=list)
    hub_snapshot: HubSnapshot | None = None  # a Hub source's repo listing at its commit
    _safetensors: dict[str, tuple[SafetensorsFile, TensorInfo]] = field(default_factory=dict, repr=False)
    _bin_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _file_hashes: BackgroundFileHashes | None = field(default=None, repr=False)

    @property
    def tensor_names(self) -> list[str]:
        if self._bin_state is not None:
            return list(self._bin_state)
        return list(self._safetensors)

    def tensor_meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name, shape) of a tensor, without reading its data."""
        if self._bin_state is not None:
            t = self._bin_state[name]
            return DTYPE_NAMES[t.dtype], tuple(t.shape)
        info = self._safetensors[name][1]
        return info.dtype, info.shape

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 (for safetensors, a copy-on-write map of only those bytes)."""
        if self._bin_state is not None:
            return self.read(name)[start:stop].contiguous()
        file, info = self._safetensors[name]
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise CheckpointError(
                f"{file.path}: rows {start}:{stop} out of range for tensor {name!r} {list(info.shape)}"
            )
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        rows = TensorInfo(
            name,
            info.dtype,
            (stop - start, *info.shape[1:]),
            info.begin + start * row_bytes,
            info.begin + stop * row_bytes,
        )
        return map_tensor(file.path, rows)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._safetensors and (self._bin_state is None or name not in self._bin_state):
            raise CheckpointError(f"{self.location}: tensor {name!r} is not in the checkpoint")
        if self._bin_state is not None:
            return self._bin_state[name].contiguous()
        file, info = self._safetensors[name]
        return read_tensor(file.path, info)

    @contextmanager
    def hashing_weight_files(self) -> Iterator[None]:
        """Within the block, the weight files are hashed on threads of their own (``file_sha256`` waits for
        them), side by side with a conversion reading them in ``file_position`` order: in the same order,
        one file per thread, a thread per 8 cores (one stream hashes faster than a conversion writes)."""
        paths = [self.folder / name for name in sorted(self.weight_files)]
        with BackgroundFileHashes(paths, min(len(paths), (os.cpu_count() or 1) // 8)) as hashes:
            self._file_hashes = hashes
            try:
                yield
            finally:
                self._file_hashes = None

    def file_position(self, name: str) -> tuple[str, int]:
        """(weight file, byte offset) of a tensor, ("", 0) where unknown: reading in this order, the
        conversion finds what ``hashing_weight_files`` read just before it in the page cache."""
        if name not in self._safetensors:
            return "", 0
        file, info = self._safetensors[name]
        return file.path.name, info.begin

    def file_sha256(self, name: str) -> str:
        """sha256 of the source file ``name`` (from ``hashing_weight_files`` where it runs)."""
        if self._file_hashes is not None and name in self._file_hashes:
            return self._file_hashes.sha256(name)
        return sha256_file(self.folder / name)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found; is this a Hugging Face model folder?") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); fix or re-download it") from exc


def _weight_map(folder: Path, index_name: str) -> dict[str, str]:
    index = _read_json(folder / index_name)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{folder / index_name}: missing or malformed weight_map; re-download it")
    for file in set(wm.values()):
        if Path(file).name != file:
            raise CheckpointError(f"{folder / index_name}: weight file {file!r} must be a plain file name")
    return wm


def _load_safetensors(folder: Path) -> tuple[list[str], dict[str, tuple[SafetensorsFile, TensorInfo]]]:
    if (folder / SAFE_INDEX).is_file():
        weight_map = _weight_map(folder, SAFE_INDEX)
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = {}, [SAFE_SINGLE]
    table: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise CheckpointError(
                f"{folder}: weight file {file!r} is listed in the index but missing; download the complete checkpoint"
            )
        header = read_header(path)
        for name, info in header.tensors.items():
            if name in table:
                raise CheckpointError(f"tensor {name!r} appears in both {table[name][0].path.name!r} and {file!r}")
            if weight_map and weight_map.get(name) != file:
                raise CheckpointError(f"{path}: tensor {name!r} is not mapped to this file by {SAFE_INDEX}")
            table[name] = (header, info)
    missing = sorted(set(weight_map) - set(table))
    if missing:
        raise CheckpointError(
            f"{folder / SAFE_INDEX} lists {missing[0]!r} (and {len(missing) - 1} more) "
            f"but no shard holds it; the download is incomplete"
        )
    return files, table


def _load_bin(folder: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    files = sorted(set(_weight_map(folder, BIN_INDEX).values())) if (folder / BIN_INDEX).is_file() else [BIN_SINGLE]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = torch.load(folder / file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for corrupt pickles
            raise CheckpointError(
                f"{folder / file}: cannot load safely ({type(exc).__name__}); convert it to safetensors"
            ) from exc
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{folder / file}: not a flat state dict of tensors")
        state.update(part)
    return files, state


def open_config(folder: Path, kind: str, location: str | None, revision: str | None) -> CheckpointSource:
    """A source with ``folder``'s config and no files or tensors yet."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
    return CheckpointSource(folder, kind, location or str(folder.absolute()), revision, config, [], [])


def open_local(
    folder: Path, kind: str = "local", location: str | None = None, revision: str | None = None
) -> CheckpointSource:
    folder = Path(folder)
    source = open_config(folder, kind, location, revision)
    source.aux_files, source.left_out_folders = carried_files(folder_files(folder))
    if (folder / SAFE_INDEX).is_file() or (folder / SAFE_SINGLE).is_file():
        source.weight_files, source._safetensors = _load_safetensors(folder)
    elif (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file():
        source.weight_files, source._bin_state = _load_bin(folder)
    else:
        raise CheckpointError(f"{folder}: no model.safetensors, {SAFE_INDEX} or pytorch_model.bin found")
    return source


def hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub refuses a request, cannot be reached, or holds no safetensors."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        SafetensorsParsingError,
    )

    unreadable = (NotASafetensorsRepoError, SafetensorsParsingError)
    return HfHubHTTPError, LocalEntryNotFoundError, *unreadable, httpx2.HTTPError, OSError, ValueError


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors are often several lines), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def hub_snapshot(src: str, revision: str | None) -> HubSnapshot | None:
    """The commit ``revision`` names and every file of the repo there (one request), or None in offline mode."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return None
    info = HfApi().model_info(src, revision=revision or constants.DEFAULT_REVISION)
    files = tuple(sibling.rfilename for sibling in info.siblings or ())
    if not files or not info.sha:
        raise CheckpointError(f"the Hub repo {src}@{revision or 'main'} holds no files")
    return HubSnapshot(src, info.sha, files)


def hub_config(snapshot: HubSnapshot, revision: str | None) -> Path:
    """The folder of the cached snapshot holding the repo's ``config.json`` at the snapshot's commit. Fetched
    through ``revision`` (not the commit), so the cache records where the branch points for offline runs."""
    from huggingface_hub import constants, hf_hub_download

    branch = revision or constants.DEFAULT_REVISION
    folder = Path(hf_hub_download(snapshot.repo_id, "config.json", revision=branch)).parent
    if folder.name != snapshot.commit:
        raise CheckpointError(
            f"{snapshot.repo_id}@{branch} moved from {snapshot.commit[:12]} to {folder.name[:12]} while moeprep "
            "read it; run again, or pin a commit as the revision"
        )
    return folder


def download(src: str, revision: str | None, snapshot: HubSnapshot | None) -> Path:
    """A Hub repo's snapshot with every carried file (``carried_files``), the config and the safetensors weights
    the index names (or ``model.safetensors``): other copies of the weights are never fetched. ``snapshot``: the
    repo's listing at the commit to download (None: offline, the cached snapshot of ``revision``)."""
    from huggingface_hub import snapshot_download

    if snapshot is None:  # the cached snapshot holds what an online run fetched
        return Path(snapshot_download(src, revision=revision, allow_patterns=["config.json"]))
    folder = hub_config(snapshot, revision)
    index = [SAFE_INDEX] if SAFE_INDEX in snapshot.files else []
    carried = carried_files(list(snapshot.files))[0]
    snapshot_download(src, revision=snapshot.commit, allow_patterns=[*carried, *index])
    shards = sorted(set(_weight_map(folder, SAFE_INDEX).values())) if index else [SAFE_SINGLE]
    snapshot_download(src, revision=snapshot.commit, allow_patterns=shards)
    return folder


def hub_headers(src: str, revision: str | None, snapshot: HubSnapshot | None) -> CheckpointSource:
    """A Hub repo's config and the headers of its safetensors shards, read by range requests (no shard is
    downloaded): enough to plan a conversion, not to run it. Offline: the cached snapshot."""
    from huggingface_hub import get_safetensors_metadata

    if snapshot is None:
        return open_local(download(src, revision, None), "hub", src, None)
    folder = hub_config(snapshot, revision)
    source = open_config(folder, "hub", src, snapshot.commit)
    source.aux_files, source.left_out_folders = carried_files(list(snapshot.files))
    source.hub_snapshot = snapshot
    metadata = get_safetensors_metadata(src, revision=snapshot.commit)
    for file, header in sorted(metadata.files_metadata.items()):
        infos = {
            name: TensorInfo(name, info.dtype, tuple(info.shape), *info.data_offsets)
            for name, info in header.tensors.items()
        }
        shard = SafetensorsFile(folder / file, infos, dict(header.metadata or {}), 0)
        source._safetensors.update({name: (shard, info) for name, info in infos.items()})
    source.weight_files = sorted(metadata.files_metadata)
    return source


def is_hub_source(src: str) -> bool:
    return not Path(src).exists() and looks_like_repo_id(src)


def open_source(
    src: str, revision: str | None = None, headers_only: bool = False, snapshot: HubSnapshot | None = None
) -> CheckpointSource:
    """A local folder, or a Hub repo id (``org/name``): downloaded by ``download``, or with ``headers_only``
    only its config and shard headers (``hub_headers``, for dry runs). ``snapshot``: the repo's listing when an
    earlier pass has it (``CheckpointSource.hub_snapshot``), so the repo is listed once."""
    if not is_hub_source(src):
        if revision:
            raise CheckpointError(f"{option('revision')} applies to Hub repo ids, not to the local folder {src}")
        return open_local(Path(src))
    try:
        snapshot = snapshot or hub_snapshot(src, revision)
        if headers_only:
            return hub_headers(src, revision, snapshot)
        folder = download(src, revision, snapshot)
    except hub_errors() as exc:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise CheckpointError(
            f"cannot fetch {src}@{revision or 'main'} from the Hub{offline}: {first_line(exc)}"
        ) from exc
    return open_local(folder, "hub", src, folder.name)  # snapshots/<commit sha>
