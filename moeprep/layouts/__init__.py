"""mxfp4 kernel layouts: pure functions from checkpoint tensors to the bytes a vLLM backend holds. Importing the
package registers every backend (``backend.LAYOUT_BACKENDS``)."""

from moeprep.layouts import cpu_amx, dequant, flashinfer_trtllm, marlin, padded, triton  # noqa: F401
