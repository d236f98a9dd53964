"""MoE LoRA adapters: read PEFT adapters in any common MoE form, write the per-expert form vLLM loads."""

from moeprep.errors import LoraError
from moeprep.lora.split import SplitReport, split_adapter

__all__ = ["LoraError", "SplitReport", "split_adapter"]
