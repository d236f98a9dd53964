#!/usr/bin/env bash
# Run the GPU tier on the GPU host (vLLM 0.26 bundle from ../shared/gpu-vllm installed in /tmp/vllm-site):
#   bash tests/gpu/run_all.sh      -> results under $OUT (junit xml, logs, generated tokens)
set -euo pipefail
cd "$(dirname "$0")/../.."
source .vllm-gpu/env.sh
export OUT="${OUT:-/tmp/moeprep-gpu-out}" PYTHONPATH="$PWD:$PYTHONPATH"
mkdir -p "$OUT"
python tests/gpu/register_plugin.py /tmp/vllm-site
python -m pytest -q -p no:cacheprovider tests/gpu --junitxml "$OUT/gpu-tests.xml" "$@" 2>&1 | tee "$OUT/gpu-tests.log"
