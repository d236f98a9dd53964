#!/usr/bin/env bash
# Install everything (scripts/install.sh), lint, and run the whole CPU test suite incl. vLLM end-to-end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/fetch_reference.sh
. .venv/bin/activate
ruff check moeprep tests scripts benchmarks
python -m pytest -q -p no:cacheprovider tests
