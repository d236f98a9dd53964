#!/usr/bin/env bash
# Run the GPU tier on the GPU host against an installed vLLM bundle: VLLM_BUNDLE=.vllm-gpu (vLLM 0.26, from
# ../shared/gpu-vllm, the default) or VLLM_BUNDLE=.vllm-gpu-034 (vLLM 0.34, from ../shared/gpu-vllm-0.34):
#   bash tests/gpu/run_all.sh [pytest args]      -> results under $OUT (junit xml, logs, generated tokens)
# With pytest-xdist's `-n N` the tests run N at a time on the one GPU: each engine then takes a small share of
# its memory and a fixed KV cache (MOEPREP_GPU_MEMORY_UTILIZATION, MOEPREP_KV_CACHE_BYTES; see generate.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/gpu/use_bundle.sh
export OUT="${OUT:-/tmp/moeprep-gpu-out}"
mkdir -p "$OUT"
if [[ " $* " =~ \ (-n\ ?|--numprocesses[=\ ])[0-9a-z] ]]; then   # pytest-xdist: several tests at a time
  export MOEPREP_GPU_MEMORY_UTILIZATION="${MOEPREP_GPU_MEMORY_UTILIZATION:-0.08}"
  export MOEPREP_KV_CACHE_BYTES="${MOEPREP_KV_CACHE_BYTES:-1073741824}"
fi
status=0
python -m pytest -q -p no:cacheprovider tests/gpu --junitxml "$OUT/gpu-tests.xml" "$@" 2>&1 | tee "$OUT/gpu-tests.log" || status=$?
# Each scored test writes NAME-summary.json; print them all (and keep them in one file), so they survive a
# caller that brings back only the console or a few files.
for summary in "$OUT"/*-summary.json; do
  if [[ -e "$summary" ]]; then echo "$(basename "$summary" -summary.json) $(cat "$summary")"; fi
done | tee "$OUT/summaries.txt"
exit "$status"
