"""Write tests/golden/triton_hopper_sm90.json: sha256 of vLLM 0.26's Hopper swizzle of seeded inputs.

Needs the reference (scripts/fetch_reference.sh). Usage: python scripts/make_golden_triton_hopper.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.golden_inputs import TRITON_HOPPER_CASES, mxfp4_inputs  # noqa: E402
from tests.reference import reference_hopper_scale, reference_hopper_value  # noqa: E402


def sha(t) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    golden = []
    for case in TRITON_HOPPER_CASES:
        blocks, scales = mxfp4_inputs(**case)
        value, scale = reference_hopper_value(blocks), reference_hopper_scale(scales)
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
    out = ROOT / "tests" / "golden" / "triton_hopper_sm90.json"
    out.write_text(
        json.dumps({"reference": "vllm 0.26.0 triton_kernels HopperMX{Value,Scale}Layout", "cases": golden}, indent=1)
        + "\n"
    )
    print(f"wrote {len(golden)} cases to {out}")


if __name__ == "__main__":
    main()
