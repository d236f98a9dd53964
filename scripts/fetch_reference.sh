#!/usr/bin/env bash
# Extract the reference triton_kernels (vendored in vLLM 0.26.0's CUDA wheel; PyPI's
# "triton-kernels" is an unrelated package) into .cache/reference/vllm-0.26.0/.
# Its layout code runs on CPU tensors with any recent triton installed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/reference/vllm-0.26.0
[ -f "$DEST/triton_kernels/__init__.py" ] && exit 0
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 vllm==0.26.0 -d "$TMP"
mkdir -p "$DEST"
python3 - "$TMP" "$DEST" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("vllm-0.26.0-*.whl"))
prefix = "vllm/third_party/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix + "triton_kernels/") and name.endswith(".py"):
            target = pathlib.Path(sys.argv[2]) / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
PY
echo "reference triton_kernels in $DEST"
