#!/usr/bin/env bash
# Install, build a tiny gpt-oss checkpoint (mxfp4 experts), convert it with the defaults (here vLLM CPU, so
# --backend auto picks cpu on CPUs with AMX, dequant on others), verify it, serve it with vLLM and send one request.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
WORK="${WORK:-$(mktemp -d)}"
PORT="${PORT:-8765}"
moeprep fixture gpt-oss "$WORK/tiny-gpt-oss" --overwrite
moeprep convert "$WORK/tiny-gpt-oss" "$WORK/prepared" --overwrite
moeprep verify "$WORK/prepared"
VLLM_CPU_KVCACHE_SPACE=1 vllm serve "$WORK/prepared" --host 127.0.0.1 --port "$PORT" \
  --max-model-len 512 --enforce-eager > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
python - "$PORT" "$WORK/prepared" <<'PY'
import json, sys, time, urllib.request
port, model = sys.argv[1], sys.argv[2]
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("vllm serve did not become ready; see serve.log")
body = {"model": model, "prompt": "once upon a time there was a river", "max_tokens": 16, "temperature": 0}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
print("completion:", json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"])
PY
echo "served $WORK/prepared with vLLM (log: $WORK/serve.log)"
