"""Record vLLM 0.26's TRT-LLM conversion of gpt-oss mxfp4 experts (``convert_gpt_oss_weight_to_mxfp4_moe_kernel_format``
with flashinfer 0.6.14; its ``block_scale_interleave`` is a CUDA op) on seeded inputs, as sha256 of each output.
GPU host only, with flashinfer importable.

Usage: python scripts/make_golden_flashinfer_trtllm.py OUT_JSON
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.golden_inputs import TRTLLM_CASES, gpt_oss_expert_inputs, vllm_padded_params  # noqa: E402

OUTPUTS = ("w13", "w2", "w13_scale", "w2_scale", "w13_bias", "w2_bias")


def main() -> None:
    import flashinfer
    from vllm.model_executor.layers.fused_moe.oracle.mxfp4 import (
        Mxfp4MoeBackend,
        convert_gpt_oss_weight_to_mxfp4_moe_kernel_format,
    )

    cases = []
    for seed, experts, hidden, inter in TRTLLM_CASES:
        inputs = gpt_oss_expert_inputs(torch.Generator().manual_seed(seed), experts, hidden, inter)
        params = [p.cuda() for p in vllm_padded_params(inputs, hidden, inter, 256, 256)]
        outputs = convert_gpt_oss_weight_to_mxfp4_moe_kernel_format(
            Mxfp4MoeBackend.FLASHINFER_TRTLLM_MXFP4_BF16, None, *params, _cache_permute_indices={}
        )
        record = {"seed": seed, "experts": experts, "hidden": hidden, "intermediate": inter, "outputs": {}}
        for name, t in zip(OUTPUTS, outputs, strict=True):
            t = t.contiguous().cpu()
            record["outputs"][name] = {
                "dtype": str(t.dtype),
                "shape": list(t.shape),
                "sha256": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest(),
            }
        cases.append(record)
    reference = (
        f"vllm 0.26.0 convert_gpt_oss_weight_to_mxfp4_moe_kernel_format (FLASHINFER_TRTLLM_MXFP4_BF16), "
        f"flashinfer {flashinfer.__version__}, {torch.cuda.get_device_name()}"
    )
    Path(sys.argv[1]).write_text(json.dumps({"reference": reference, "cases": cases}, indent=1) + "\n")
    print(json.dumps(cases, indent=1)[:3000])


if __name__ == "__main__":
    main()
