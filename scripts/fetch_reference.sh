#!/usr/bin/env bash
# Extract the reference transforms of the targeted vLLM (0.26.0) into .cache/reference/:
# - vllm-0.26.0/triton_kernels (vendored in vLLM's CUDA wheel; PyPI's "triton-kernels" is an unrelated
#   package): its layout code runs on CPU tensors with any recent triton installed;
# - vllm-0.26.0/vllm/.../oracle/mxfp4.py: vLLM's own load-time conversion of gpt-oss mxfp4 experts;
# - flashinfer-0.6.14 (the version vLLM 0.26.0 pins): the Python row shuffles of its TRT-LLM MoE weights.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/reference
ORACLE=vllm/model_executor/layers/fused_moe/oracle/mxfp4.py
FLASHINFER_FILES="flashinfer/utils.py flashinfer/fused_moe/core.py flashinfer/gemm/gemm_bf16_fp4.py"
[ -f "$DEST/vllm-0.26.0/triton_kernels/__init__.py" ] && [ -f "$DEST/vllm-0.26.0/$ORACLE" ] \
  && [ -f "$DEST/flashinfer-0.6.14/flashinfer/utils.py" ] && exit 0
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 vllm==0.26.0 -d "$TMP"
python3 -m pip download -q --no-deps --only-binary=:all: flashinfer-python==0.6.14 -d "$TMP"
python3 - "$TMP" "$DEST" "$ORACLE" $FLASHINFER_FILES <<'PY'
import pathlib, sys, zipfile
tmp, dest, oracle, *flashinfer_files = sys.argv[1:]

def extract(wheel_glob: str, target: pathlib.Path, keep) -> None:
    wheel = next(pathlib.Path(tmp).glob(wheel_glob))
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if (relative := keep(name)) is not None:
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(z.read(name))

prefix = "vllm/third_party/"
extract(
    "vllm-0.26.0-*.whl",
    pathlib.Path(dest) / "vllm-0.26.0",
    lambda n: n[len(prefix):] if n.startswith(prefix + "triton_kernels/") and n.endswith(".py")
    else (n if n == oracle else None),
)
extract(
    "flashinfer_python-0.6.14-*.whl",
    pathlib.Path(dest) / "flashinfer-0.6.14",
    lambda n: n if n in flashinfer_files else None,
)
PY
echo "reference transforms in $DEST"
