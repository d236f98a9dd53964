"""Fingerprint the reference code of the Triton mxfp4 layouts in vLLM wheels: the vendored ``triton_kernels``
package (its Python files, as scripts/fetch_reference.sh extracts them) and vLLM's ``_swizzle_mxfp4``, which
together produce the bytes vLLM holds. Releases whose fingerprint equals 0.26.0's (the code
tests/test_layout_triton.py runs bitwise on CPU) produce the same layout; tests/test_reference_sources.py holds
the triton recipe's vLLM ranges to that.

Usage: python scripts/record_reference_sources.py vllm-0.26.0-*.whl vllm-0.34.0-*.whl ... > OUT.json
(tests/golden/reference_sources.json adds a note for each release whose swizzle differs but was verified on a GPU)
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import zipfile
from pathlib import Path

TRITON_KERNELS = "vllm/third_party/triton_kernels/"
SWIZZLE_FILE = "vllm/model_executor/layers/quantization/utils/mxfp4_utils.py"
SWIZZLE = "_swizzle_mxfp4"


def tree_sha256(files: dict[str, bytes]) -> str:
    """sha256 over the sorted (path, sha256 of content) pairs."""
    listing = "".join(f"{path}\0{hashlib.sha256(data).hexdigest()}\n" for path, data in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def function_sha256(source: str, name: str) -> str:
    """sha256 of a top-level function's source text, as written."""
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return hashlib.sha256(ast.get_source_segment(source, node).encode()).hexdigest()


def fingerprint(wheel: Path) -> tuple[str, dict[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")).split("-")[1].split(".dist")[0]
        kernels = {
            n[len(TRITON_KERNELS) :]: z.read(n)
            for n in z.namelist()
            if n.startswith(TRITON_KERNELS) and n.endswith(".py")
        }
        swizzle = z.read(SWIZZLE_FILE).decode()
    return version, {"triton_kernels": tree_sha256(kernels), SWIZZLE: function_sha256(swizzle, SWIZZLE)}


def main() -> None:
    releases = dict(fingerprint(Path(wheel)) for wheel in sys.argv[1:])
    print(json.dumps({"recorded_with": "scripts/record_reference_sources.py", "releases": releases}, indent=1))


if __name__ == "__main__":
    main()
