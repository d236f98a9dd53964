"""The ``moeprep.json`` manifest: schema, load/validate, and the integrity checks built on it.

Imported by the vLLM runtime, so it depends on the standard library only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from moeprep.errors import ManifestError
from moeprep.schema.routing import FusedSharedExperts, fused_shared_experts
from moeprep.schema.typed_json import FieldTypeError, from_json

MANIFEST_NAME = "moeprep.json"
SEAL_NAME = "moeprep.seal.json"  # {"moeprep.json": sha256}: the manifest records every file but itself
LORA_RECORD_NAME = "moeprep_lora.json"  # in a split LoRA adapter: the base it was split for
PASSTHROUGH_RECIPE = "passthrough"  # the recipe of a target whose tensors all pass through
SCHEMA_VERSION = 2  # 2: tensors hashed as sha256 trees
QUANT_METHOD = "moeprep"


def checkpoint_quantization(config: Mapping[str, Any]) -> Any:
    """The checkpoint's own ``quantization_config``: as stored, or for a prepared folder the original that
    moeprep's wraps (None for an unquantized checkpoint)."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return quant.get("original")
    return quant


@dataclass
class FileRecord:
    """``sha256`` of the whole file, or with ``covers="header"`` (safetensors shards) of the bytes before
    the data region only; the shard's tensor records then cover the rest, contiguously."""

    size: int
    sha256: str
    covers: str = "file"


@dataclass
class TensorRecord:
    """One tensor: the bytes ``[begin, end)`` of ``file`` (a ``stored_shape`` safetensors entry) hash
    to ``sha256_tree`` (``moeprep.checkpoint.hashing``: the sha256 of the sha256 of each 16 MiB piece); vLLM
    holds them as a tensor of logical ``shape`` and element ``strides``."""

    file: str
    dtype: str
    stored_shape: list[int]
    shape: list[int]
    strides: list[int]
    begin: int
    end: int
    sha256_tree: str
    recipe: str
    sources: list[str]


@dataclass
class Target:
    """What the tensors were prepared for; the runtime compares this with the running vLLM."""

    backend: str
    recipe: str
    recipe_version: int
    vllm_versions: list[str]
    tp_size: int = 1
    ep_size: int = 1
    padding: dict[str, int] = field(default_factory=dict)
    knobs: dict[str, Any] = field(default_factory=dict)
    # Inclusive [low, high] vLLM versions whose own transform gives these bytes; a folder is served by any vLLM
    # in them. Empty: the exact ``vllm_versions`` (manifests written before ranges); pass-through folders are
    # served by any vLLM.
    vllm_ranges: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(len(span) != 2 for span in self.vllm_ranges):
            raise FieldTypeError("target.vllm_ranges holds a range that is not [low, high]")

    @property
    def locked_to_vllm(self) -> bool:
        """Whether these tensors are laid out for particular vLLM releases (pass-through tensors are not)."""
        return self.recipe != PASSTHROUGH_RECIPE

    @property
    def served_vllm_ranges(self) -> list[list[str]]:
        return self.vllm_ranges or [[version, version] for version in self.vllm_versions]

    @property
    def moe_ranks(self) -> int:
        """How many ranks have their own expert files: the EP size under expert parallelism, else the TP
        size (1: every tensor is in the replicated shards)."""
        return self.ep_size if self.ep_size > 1 else self.tp_size


@dataclass
class Source:
    kind: str  # "local" or "hub"
    location: str  # folder path or repo id
    revision: str | None
    files: dict[str, FileRecord]


@dataclass
class Manifest:
    moeprep_version: str
    model_type: str
    architectures: list[str]
    source: Source
    target: Target
    files: dict[str, FileRecord]
    tensors: dict[str, TensorRecord]
    routing: dict[str, Any] | None = None
    lora: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    # Per-rank folders (convert --tp / --ep): MoE rank r's own tensors (its expert shards), in its own files.
    rank_tensors: list[dict[str, TensorRecord]] = field(default_factory=list)

    @cached_property
    def fused_shared(self) -> FusedSharedExperts | None:
        """The routing contract of fused shared experts, parsed once; None where the folder has none."""
        return fused_shared_experts(self.routing)

    def all_tensor_records(self) -> Iterator[tuple[str, TensorRecord]]:
        """Every tensor record, replicated and per rank (a name repeats once per rank, in another file)."""
        yield from self.tensors.items()
        for records in self.rank_tensors:
            yield from records.items()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: not a JSON object; re-run moeprep convert")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; "
                "use the moeprep version that wrote it or re-run moeprep convert"
            )
        try:
            manifest = from_json(cls, data, "manifest")
            manifest.fused_shared  # noqa: B018  (parses and checks the routing contract now, once)
            return manifest
        except FieldTypeError as exc:
            raise ManifestError(f"{where}: malformed manifest ({exc}); re-run moeprep convert") from exc


def manifest_sha256(folder: Path) -> str:
    """sha256 of ``folder/moeprep.json``: what its seal and split LoRA adapters record."""
    return sha256_bytes((Path(folder) / MANIFEST_NAME).read_bytes())


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``moeprep.json`` and then its seal (the last files of a prepared folder)."""
    text = manifest.to_json().encode("utf-8")
    (Path(folder) / MANIFEST_NAME).write_bytes(text)
    _write_seal(folder, sha256_bytes(text))


def seal_manifest(folder: Path) -> None:
    """Record the sha256 of ``moeprep.json`` as it is now in ``moeprep.seal.json``."""
    _write_seal(folder, manifest_sha256(folder))


def _write_seal(folder: Path, digest: str) -> None:
    (Path(folder) / SEAL_NAME).write_text(json.dumps({MANIFEST_NAME: digest}) + "\n", encoding="utf-8")


def load_manifest(folder: Path) -> Manifest:
    """Read ``folder/moeprep.json``, check it against its seal, and validate it."""
    path, seal_path = Path(folder) / MANIFEST_NAME, Path(folder) / SEAL_NAME
    if not path.is_file() or not seal_path.is_file():
        missing = path if not path.is_file() else seal_path
        raise ManifestError(
            f"{missing} not found: {folder} is not a complete moeprep output; run moeprep convert again"
        )
    try:
        raw = path.read_bytes()
        seal = json.loads(seal_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{seal_path}: unreadable ({exc}); run moeprep convert again") from exc
    if not isinstance(seal, dict) or seal.get(MANIFEST_NAME) != sha256_bytes(raw):
        raise ManifestError(f"{path} does not match {SEAL_NAME}: the manifest was modified; convert again")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc}); run moeprep convert again") from exc
    return Manifest.from_dict(data, str(path))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_file_sizes(folder: Path, manifest: Manifest) -> None:
    """Cheap integrity check (the runtime runs it at every load): every recorded file is present
    with its recorded size, and small non-weight files (configs) hash to their recorded sha256."""
    for name, record in manifest.files.items():
        path = Path(folder) / name
        if not path.is_file():
            raise ManifestError(f"{path} is missing; the prepared folder is incomplete, convert again")
        size = path.stat().st_size
        if size != record.size:
            raise ManifestError(
                f"{path} has {size} bytes, the manifest records {record.size}; "
                "the folder was modified or truncated, convert again"
            )
        if size <= 1 << 20 and not name.endswith(".safetensors") and sha256_bytes(path.read_bytes()) != record.sha256:
            raise ManifestError(f"{path} does not match its sha256 in {MANIFEST_NAME}; convert again")
