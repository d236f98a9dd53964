"""moeprep: prepare Mixture-of-Experts checkpoints offline so vLLM loads them without transforms."""

__version__ = "0.1.0"
