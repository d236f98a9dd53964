"""Run a plan: stream tensors from the source into an atomically written prepared folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moeprep import __version__
from moeprep.checkpoint.hashing import sha256_file
from moeprep.checkpoint.source import (
    BIN_INDEX,
    SAFE_INDEX,
    CheckpointSource,
    carried_name,
    is_hub_source,
    open_source,
)
from moeprep.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, AtomicFolder, ShardedWrite, write_json, write_sharded
from moeprep.errors import UnsupportedModelError, option
from moeprep.families.config_view import config_view
from moeprep.jobs import TensorJob
from moeprep.modelcard import render_model_card
from moeprep.plan import Plan, PlanOptions, build_plan
from moeprep.schema.manifest import (
    MANIFEST_NAME,
    QUANT_METHOD,
    SCHEMA_VERSION,
    FileRecord,
    Manifest,
    Source,
    Target,
    TensorRecord,
    write_manifest,
)
from moeprep.schema.routing import FusedSharedExperts, routing_json
from moeprep.schema.serving import unserved_reason

LORA_FOLDER = "lora"


def prepared_config(config: dict[str, Any], target: Target, fused: FusedSharedExperts | None = None) -> dict[str, Any]:
    """config.json with the original quantization_config wrapped under the ``moeprep`` method; with fused
    shared experts, the runtime's architecture that routes to the slots."""
    return {
        **config,
        **({"architectures": [fused.architecture]} if fused else {}),
        "quantization_config": {
            "quant_method": QUANT_METHOD,
            "schema_version": SCHEMA_VERSION,
            "backend": target.backend,
            "manifest": MANIFEST_NAME,
            "original": config.get("quantization_config"),
        },
    }


def tensor_records(jobs: dict[str, TensorJob], written: ShardedWrite) -> dict[str, TensorRecord]:
    """The manifest records of ``jobs``' tensors as ``written``."""
    records = {}
    for name, job in jobs.items():
        file = written.weight_map[name]
        begin, end = written.files[file].tensor_offsets[name]
        records[name] = TensorRecord(
            file=file,
            dtype=job.entry.dtype,
            stored_shape=list(job.entry.shape),
            shape=list(job.view_shape),
            strides=list(job.view_strides),
            begin=begin,
            end=end,
            sha256_tree=written.files[file].tensor_sha256_tree[name],
            recipe=job.recipe,
            sources=list(job.sources),
        )
    return records


def source_record(source: CheckpointSource) -> Source:
    """Provenance: every source file with its size and sha256 (weight files hashed while the conversion
    runs, see ``CheckpointSource.hashing_weight_files``)."""
    indexes = [name for name in (SAFE_INDEX, BIN_INDEX) if (source.folder / name).is_file()]
    names = ["config.json", *source.aux_files, *indexes, *source.weight_files]
    files = {name: FileRecord((source.folder / name).stat().st_size, source.file_sha256(name)) for name in names}
    return Source(source.kind, source.location, source.revision, files)


def _file_record(path: Path) -> FileRecord:
    return FileRecord(path.stat().st_size, sha256_file(path))


def write_loras(adapters: Sequence[Path], source: CheckpointSource, plan: Plan, folder: Path) -> list[dict]:
    """Split each adapter for the base being prepared into ``folder/lora/<adapter folder name>/``."""
    from moeprep.lora.split import BaseExperts, write_split

    names = [Path(a).name for a in adapters]
    if len(set(names)) != len(names):
        raise UnsupportedModelError(f"{option('loras')} adapters need distinct folder names; got {', '.join(names)}")
    if not adapters:
        return []
    base = BaseExperts.from_parts(source.config, plan.target, source.location, None)
    records = []
    for adapter, name in zip(adapters, names, strict=True):
        report = write_split(Path(adapter), base, folder / LORA_FOLDER / name)
        records.append(
            {"name": name, "path": f"{LORA_FOLDER}/{name}", "source": str(Path(adapter).absolute()), **asdict(report)}
        )
    return records


def load_plan(
    src: str, backend: str, revision: str | None = None, options: PlanOptions | None = None, headers_only: bool = False
) -> tuple[CheckpointSource, Plan]:
    """The source and the plan for it (``headers_only``: a Hub source's shards are not downloaded, for dry runs).
    A Hub source is planned from its shard headers first, so a bad option or model fails before any download."""
    options = options or PlanOptions()
    snapshot = None
    if is_hub_source(src) and not headers_only:
        headers = open_source(src, revision, headers_only=True)
        build_plan(headers, backend, options)
        revision = headers.revision or revision  # the commit the headers were read at
        snapshot = headers.hub_snapshot
    source = open_source(src, revision, headers_only, snapshot)
    return source, build_plan(source, backend, options)


def convert(
    source: CheckpointSource,
    plan: Plan,
    out: Path,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    served_as: str | None = None,
    loras: Sequence[Path] = (),
) -> Manifest:
    """Write the prepared folder for ``plan`` to ``out``; the manifest is written last. ``served_as``:
    the Hub repo it will be uploaded to, for the model card's serve command; ``loras``: adapters split
    for this base into ``lora/<name>/`` (first, so a bad adapter fails before the long part)."""
    architectures = list(config_view(source.config).get("architectures") or [])  # checked before anything is written
    groups: dict[int | None, dict[str, TensorJob]] = {}  # rank (None: replicated) -> jobs by tensor name
    for job in sorted(plan.jobs, key=lambda job: source.file_position(job.sources[0]) if job.sources else ("", 0)):
        groups.setdefault(job.rank, {})[job.entry.name] = job
    with AtomicFolder(out, overwrite, [source.folder, *loras]) as tmp, source.hashing_weight_files():
        lora_records = write_loras(loras, source, plan, tmp)
        for name in source.aux_files:
            (tmp / carried_name(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.folder / name, tmp / carried_name(name))
        write_json(tmp / "config.json", prepared_config(source.config, plan.target, plan.fused_shared))
        written = {
            rank: write_sharded(
                tmp,
                [job.entry for job in jobs.values()],
                lambda e, jobs=jobs: jobs[e.name].run(source),
                max_shard_bytes,
                on_bytes,
                rank,
            )
            for rank, jobs in groups.items()
        }
        model_type = str(source.config["model_type"])
        src_record = source_record(source)
        (tmp / "README.md").write_text(
            render_model_card(
                src_record,
                plan.target,
                model_type,
                {**plan.summary(), "lora": len(lora_records)},
                served_as,
                unserved_reason(plan.target, list(groups.get(0, {})), on_cpu=False),
            ),
            encoding="utf-8",
        )
        shards = {name: w for write in written.values() for name, w in write.files.items()}
        every_file = (p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file())
        files = {name: _file_record(tmp / name) for name in every_file if name not in shards}
        files |= {name: FileRecord(w.size, w.header_sha256, covers="header") for name, w in shards.items()}
        records = {rank: tensor_records(groups[rank], write) for rank, write in written.items()}
        manifest = Manifest(
            moeprep_version=__version__,
            model_type=model_type,
            architectures=architectures,
            source=src_record,
            target=plan.target,
            files=dict(sorted(files.items())),
            tensors=records.get(None, {}),
            routing=routing_json(plan.fused_shared),
            lora=lora_records,
            rank_tensors=[records.get(rank, {}) for rank in range(plan.target.moe_ranks)]
            if plan.target.moe_ranks > 1
            else [],
        )
        write_manifest(tmp, manifest)
    return manifest
