# Source from the repository root on the GPU host: `source tests/gpu/use_bundle.sh` puts the installed vLLM
# bundle (VLLM_BUNDLE=.vllm-gpu, vLLM 0.26, the default; or .vllm-gpu-034, vLLM 0.34) and this checkout on the
# path, registers moeprep's plugin entry point there, and applies tests/gpu/bundle_fixups.py. The GPU tier
# (run_all.sh) and the benchmarks run under it.
source "${VLLM_BUNDLE:-.vllm-gpu}/env.sh"
export PYTHONPATH="$PWD:$PYTHONPATH"
MOEPREP_VLLM_SITE="$(python -c 'import pathlib, vllm; print(pathlib.Path(vllm.__file__).parents[1])')"
python tests/gpu/register_plugin.py "$MOEPREP_VLLM_SITE"
python tests/gpu/bundle_fixups.py "$MOEPREP_VLLM_SITE"   # what the trimmed offline bundles leave out (see the script)
