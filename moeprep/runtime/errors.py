"""The runtime's error type (vLLM reports it; the message says what to do)."""


class PreparedCheckpointMismatch(ValueError):
    """The prepared folder does not fit the running vLLM."""
