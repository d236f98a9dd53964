"""Fit a trimmed offline vLLM bundle (``../shared/gpu-vllm*``) to what it leaves out, for the GPU tier only.

The bundles have no nvidia-cutlass-dsl (``cutlass``), which ``pip install vllm`` brings. vLLM 0.34 builds the MoE
router of GLM-4-MoE and other models (``GateLinear``) with a CuTe-DSL bf16x3 GEMM on Hopper, which imports
``cutlass``, so the original checkpoints fail there as well as the prepared ones. Without ``cutlass`` this turns
that GEMM off (vLLM then runs the router with its plain GEMM, for the original and the prepared folder alike).
vLLM 0.26 has the same switch, opt-in and SM100-only there, so the edit changes nothing that runs on it.
Usage: python tests/gpu/bundle_fixups.py SITE      (SITE: where the bundle installed vLLM; idempotent)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GATE = Path("vllm", "model_executor", "layers", "fused_moe", "router", "gate_linear.py")
BEFORE = "        self.allow_bf16x3_router_gemm = (\n"
HAS_CUTLASS = '__import__("importlib.util").util.find_spec("cutlass") is not None'
AFTER = f"        self.allow_bf16x3_router_gemm = {HAS_CUTLASS} and (\n"


def fix(site: Path) -> list[str]:
    """The fixes applied under ``site`` (none where ``cutlass`` is installed or vLLM has no such router)."""
    gate = site / GATE
    if importlib.util.find_spec("cutlass") is not None or not gate.exists():
        return []
    text = gate.read_text()
    if AFTER in text:
        return [f"{gate}: already off without cutlass"]
    if BEFORE not in text:
        return []
    gate.write_text(text.replace(BEFORE, AFTER, 1))
    return [f"{gate}: bf16x3 router GEMM off without cutlass"]


if __name__ == "__main__":
    print("\n".join(fix(Path(sys.argv[1]))) or "nothing to fix")
