"""vLLM plugin (entry point ``vllm.general_plugins: moeprep = moeprep.runtime:register``).

Imports only torch, safetensors, vllm and moeprep's core (``moeprep.schema``, ``moeprep.errors``;
``tests/test_import_structure.py``).
"""


def register() -> None:
    """Register the ``moeprep`` quantization method, the fused-shared-expert models and the LoRA base check
    with vLLM (idempotent)."""
    from moeprep.runtime import quant_config  # noqa: F401  (registers on import)
    from moeprep.runtime.fused_shared import register_fused_models
    from moeprep.runtime.lora_check import install_adapter_check

    install_adapter_check()
    register_fused_models()
