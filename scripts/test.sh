#!/usr/bin/env bash
# Install everything (scripts/install.sh), lint, and run the whole CPU test suite incl. vLLM end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/fetch_reference.sh
. .venv/bin/activate
ruff check moeprep tests scripts benchmarks
# Unit tests on two workers (each mostly runs one CLI subprocess at a time); the vLLM end-to-end tests one at a
# time, since each server takes the cores.
python -m pytest -q -p no:cacheprovider -n 2 tests --ignore=tests/e2e
python -m pytest -q -p no:cacheprovider tests/e2e
