"""mxfp4 kernel layouts: pure functions from checkpoint tensors to the bytes a vLLM backend holds."""
