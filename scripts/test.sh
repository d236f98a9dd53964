#!/usr/bin/env bash
# Install everything (scripts/install.sh), lint, and run the whole CPU test suite incl. vLLM end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/fetch_reference.sh
. .venv/bin/activate
ruff check moeprep tests scripts benchmarks
# Unit tests on two workers (each mostly runs one CLI subprocess at a time); the vLLM end-to-end tests on two
# workers too, one module each at a time (a module's servers share what they served), each worker's servers bound
# to a core of their own (tests/e2e/vllm_server.py): 20 -> 11 minutes on the 2-core box.
python -m pytest -q -p no:cacheprovider -n 2 tests --ignore=tests/e2e
python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests/e2e
