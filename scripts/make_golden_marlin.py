"""Record the installed vLLM's Marlin mxfp4 MoE transform (``prepare_moe_mxfp4_layer_for_marlin``, a CUDA op) on
seeded inputs: small cases as raw tensors, gpt-oss-sized cases as sha256. GPU host only.

Usage: python scripts/make_golden_marlin.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.golden_inputs import MARLIN_CASES as CASES  # noqa: E402
from tests.golden_inputs import marlin_inputs as seeded_inputs  # noqa: E402


def main() -> None:
    import vllm
    from safetensors.torch import save_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.utils.marlin_utils_fp4 import prepare_moe_mxfp4_layer_for_marlin

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    layer = torch.nn.Module()
    layer.params_dtype = torch.bfloat16
    summary = []
    with set_current_vllm_config(VllmConfig()):
        for seed, e, n, k in CASES:
            inputs = seeded_inputs(seed, e, n, k)
            cuda = {name: t.cuda() for name, t in inputs.items()}
            outputs = prepare_moe_mxfp4_layer_for_marlin(
                layer, cuda["w13"], cuda["w2"], cuda["w13_scale"], cuda["w2_scale"], cuda["w13_bias"], cuda["w2_bias"]
            )
            named = dict(zip(["w13", "w2", "w13_scale", "w2_scale", "w13_bias", "w2_bias"], outputs, strict=True))
            record = {"seed": seed, "experts": e, "intermediate": n, "hidden": k, "outputs": {}}
            for name, t in named.items():
                t = t.contiguous().cpu()
                record["outputs"][name] = {
                    "dtype": str(t.dtype),
                    "shape": list(t.shape),
                    "sha256": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest(),
                }
            if e * n * k <= 2 * 192 * 256:
                save_file(
                    {
                        **{f"in.{k2}": v for k2, v in inputs.items()},
                        **{f"out.{k2}": v.contiguous().cpu() for k2, v in named.items()},
                    },
                    out / f"marlin_mxfp4_{seed}.safetensors",
                )
            summary.append(record)
    reference = f"vllm {vllm.__version__} prepare_moe_mxfp4_layer_for_marlin"
    (out / "marlin_mxfp4_golden.json").write_text(json.dumps({"reference": reference, "cases": summary}, indent=1))
    print(json.dumps(summary, indent=1)[:2000])


if __name__ == "__main__":
    main()
