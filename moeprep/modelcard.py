"""The model card (README.md with Hub YAML metadata) written into every prepared folder."""

from __future__ import annotations

from moeprep import __version__
from moeprep.checkpoint.manifest import Source, Target


def render_model_card(source: Source, target: Target, model_type: str, summary: dict[str, object]) -> str:
    base = source.location if source.kind == "hub" else None
    tags = ["moeprep", f"backend-{target.backend}", model_type]
    front = ["---", "library_name: vllm"]
    if base:
        front += [f"base_model: {base}", "base_model_relation: quantized"]
    front += ["tags:", *[f"- {t}" for t in tags], "---"]
    revision = f" at revision `{source.revision}`" if source.revision else ""
    recipes = ", ".join(f"{name} ×{count}" for name, count in dict(summary["recipes"]).items())  # type: ignore[call-overload]
    return "\n".join(
        [
            *front,
            "",
            f"# {model_type} prepared by moeprep for vLLM",
            "",
            f"Prepared from `{source.location}`{revision} by moeprep {__version__} for the "
            f"`{target.backend}` backend (recipe `{target.recipe}` v{target.recipe_version}).",
            "",
            "## What was done",
            "",
            f"- {summary['tensors']} tensors written ({recipes}); "
            f"{summary['moe_layers']} MoE layers with {summary['experts']} experts, top-{summary['top_k']}.",
            '- `config.json` carries `quantization_config.quant_method = "moeprep"`: vLLM without the moeprep '
            "plugin refuses this folder instead of mis-loading it.",
            "",
            "## Serve",
            "",
            "```bash",
            "pip install moeprep  # registers the vLLM plugin",
            f"vllm serve {base or '<this folder>'}",
            "```",
            "",
            "## Verification",
            "",
            f"- Layouts verified against vLLM {', '.join(target.vllm_versions)}; tensor parallel {target.tp_size}, "
            f"expert parallel {target.ep_size}.",
            "- Every file and tensor is recorded with its sha256 in `moeprep.json`; "
            "`moeprep verify <folder>` re-checks them.",
            "",
        ]
    )
