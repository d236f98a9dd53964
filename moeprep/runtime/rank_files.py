"""This rank's own expert files (``convert --tp N``): vLLM's loader never reads them (the index does not list
them), so the MoE methods read them themselves, each rank only its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from vllm.logger import init_logger

from moeprep.schema.manifest import TensorRecord

logger = init_logger("vllm.moeprep")  # under vLLM's logger, so its handlers print it


def each_rank_tensor(folder: Path, records: dict[str, TensorRecord]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every record, read file by file from ``folder``."""
    by_file: dict[str, list[str]] = {}
    for name, record in records.items():
        by_file.setdefault(record.file, []).append(name)
    for file, names in sorted(by_file.items()):
        logger.info_once(f"moeprep: this rank reads its experts from {file}")
        with safe_open(str(folder / file), framework="pt") as shard:
            for name in names:
                yield name, shard.get_tensor(name)
