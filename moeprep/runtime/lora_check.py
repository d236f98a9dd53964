"""LoRA adapters split by ``moeprep lora split`` are only loaded onto the base they were split for.

vLLM reads every adapter's config through ``PEFTHelper.from_local_dir``; the plugin wraps it so an
adapter carrying ``moeprep_lora.json`` is compared with the prepared folder being served (the sha256 of
its ``moeprep.json``, or for adapters written by ``convert --lora``, the folder they live in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeprep.errors import PreparedCheckpointMismatch
from moeprep.schema.manifest import LORA_RECORD_NAME, manifest_sha256

_served_base: Path | None = None  # the prepared folder this process serves, once the plugin has read it
_served_manifest_sha256: str | None = None


def serve_base(folder: Path) -> None:
    global _served_base, _served_manifest_sha256
    _served_base = Path(folder).resolve()
    _served_manifest_sha256 = manifest_sha256(folder)


def check_adapter_base(lora_path: str) -> None:
    """Refuse a moeprep-split adapter whose base is not the served prepared folder."""
    record_path = Path(lora_path) / LORA_RECORD_NAME
    if not record_path.is_file():
        return  # not split by moeprep: vLLM's own checks apply
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        expected = record["base_manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreparedCheckpointMismatch(
            f"moeprep: {record_path} is unreadable ({exc}); split the adapter again"
        ) from exc
    if _served_base is None:
        raise PreparedCheckpointMismatch(
            f"moeprep: LoRA adapter {lora_path} was split for a moeprep-prepared base, but vLLM is not serving one; "
            "serve the prepared folder it was split for"
        )
    if expected is None:  # written into a prepared folder by `convert --lora`: that folder's own adapter
        if not Path(lora_path).resolve().is_relative_to(_served_base):
            raise PreparedCheckpointMismatch(
                f"moeprep: LoRA adapter {lora_path} belongs to another prepared folder than {_served_base}; "
                "use the adapters under this folder's lora/ or split the adapter for it"
            )
        return
    actual = _served_manifest_sha256
    if expected != actual:
        raise PreparedCheckpointMismatch(
            f"moeprep: LoRA adapter {lora_path} was split for base {record.get('base')} (manifest {expected[:12]}), "
            f"but vLLM serves {_served_base} (manifest {str(actual)[:12]}); run moeprep lora split for this base"
        )


def install_adapter_check() -> None:
    """Wrap vLLM's adapter-config reader once (idempotent)."""
    from vllm.lora.peft_helper import PEFTHelper

    original = PEFTHelper.from_local_dir.__func__  # type: ignore[attr-defined]
    if getattr(original, "moeprep_checked", False):
        return

    def from_local_dir(cls: Any, lora_path: str, *args: Any, **kwargs: Any) -> Any:
        check_adapter_base(lora_path)
        return original(cls, lora_path, *args, **kwargs)

    from_local_dir.moeprep_checked = True  # type: ignore[attr-defined]
    PEFTHelper.from_local_dir = classmethod(from_local_dir)  # type: ignore[method-assign, assignment]
