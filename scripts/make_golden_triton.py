"""Write tests/golden/triton_{hopper_sm90,blackwell_sm100}.json: sha256 of vLLM 0.26's triton_kernels
layouts of seeded inputs. Needs the reference (scripts/fetch_reference.sh).

Usage: python scripts/make_golden_triton.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.golden_inputs import TRITON_CASES, mxfp4_inputs  # noqa: E402
from tests.reference import reference_blackwell, reference_hopper_scale, reference_hopper_value  # noqa: E402

REFERENCES = {
    "triton_hopper_sm90.json": (
        "HopperMX{Value,Scale}Layout",
        lambda b, s: (reference_hopper_value(b), reference_hopper_scale(s)),
    ),
    "triton_blackwell_sm100.json": ("BlackwellMX{Value,Scale}Layout", reference_blackwell),
}


def sha(t) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    for file, (layouts, reference) in REFERENCES.items():
        golden = []
        for case in TRITON_CASES:
            blocks, scales = mxfp4_inputs(**case)
            value, scale = reference(blocks, scales)
            golden.append(
                {
                    **case,
                    "blocks": sha(blocks),
                    "scales": sha(scales),
                    "value": sha(value),
                    "value_shape": list(value.shape),
                    "scale": sha(scale),
                    "scale_shape": list(scale.shape),
                }
            )
        out = ROOT / "tests" / "golden" / file
        out.write_text(
            json.dumps({"reference": f"vllm 0.26.0 triton_kernels {layouts}", "cases": golden}, indent=1) + "\n"
        )
        print(f"wrote {len(golden)} cases to {out}")


if __name__ == "__main__":
    main()
