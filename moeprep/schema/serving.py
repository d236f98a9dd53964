"""Which prepared folders the moeprep runtime serves, and why it refuses the others until they are verified.
Shared by the plugin, which refuses them, and by ``convert`` and the model card, which say so instead of
printing a serve command that would fail. No vLLM import here."""

from __future__ import annotations

from collections.abc import Collection

from moeprep.schema.manifest import Target
from moeprep.schema.names import SCALE_SUFFIX, is_prepared_param

CPU_BACKENDS = ("dequant", "cpu")  # mxfp4 layouts served on vLLM CPU, also from --tp rank files
# Layouts moeprep writes but its runtime cannot serve yet, with the reason.
NOT_SERVED_YET = {
    "flashinfer-trtllm": "serving the TRT-LLM layout needs a Blackwell (sm100) GPU to verify it on; on Hopper "
    "convert with --backend triton or marlin",
}


def backend_not_served(backend: str) -> str | None:
    return f"cannot serve backend {backend!r} yet: {NOT_SERVED_YET[backend]}" if backend in NOT_SERVED_YET else None


def unserved_reason(target: Target, rank_tensors: Collection[str], on_cpu: bool) -> str | None:
    """Why the runtime refuses a folder prepared for ``target`` whose first rank's own files hold ``rank_tensors``
    (empty for a single-partition folder), on vLLM CPU or (``on_cpu`` False) on GPUs; None when it serves it."""
    if reason := backend_not_served(target.backend):
        return reason
    if target.backend == "cpu" and rank_tensors and target.ep_size > 1:
        return (
            "serving expert-parallel cpu layouts (convert --ep) is not verified yet; convert with --tp, or serve "
            "the original checkpoint with --enable-expert-parallel"
        )
    if rank_tensors and target.ep_size > 1 and not on_cpu:
        return (
            "serving per-rank expert-parallel folders (convert --ep) on GPUs is not verified yet (it needs a "
            f"multi-GPU host; vLLM CPU serves them: --tensor-parallel-size {target.ep_size} "
            "--enable-expert-parallel); on GPUs convert with --tp, or serve the original checkpoint with "
            "--enable-expert-parallel"
        )
    if target.backend not in CPU_BACKENDS and any(is_prepared_param(name) for name in rank_tensors):
        return (
            f"serving tensor-parallel {target.backend} layouts (convert --tp with an mxfp4 GPU backend) is not "
            "verified yet: it needs a multi-GPU host; serve a folder converted without --tp at "
            "--tensor-parallel-size 1, or the original checkpoint"
        )
    if any(name.endswith(f".{SCALE_SUFFIX}") for name in rank_tensors):
        return (
            "serving tensor-parallel block-fp8 expert shards is not verified yet (it needs a multi-GPU host); "
            "serve a folder converted without --tp, which vLLM shards itself"
        )
    return None
