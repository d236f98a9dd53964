"""Load accounting: every prepared manifest tensor must land in a parameter vLLM built."""

from __future__ import annotations

from moeprep.errors import PreparedCheckpointMismatch


class PreparedTensorTracker:
    """Tracks prepared tensors from the manifest through loading; the check runs when the last
    layer that holds prepared parameters has been post-processed."""

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.loaded: set[str] = set()
        self.open_layers: set[str] = set()

    def layer_built(self, prefix: str) -> None:
        self.open_layers.add(prefix)

    def tensor_loaded(self, name: str) -> None:
        self.loaded.add(name)

    def layer_ready(self, prefix: str) -> None:
        self.open_layers.discard(prefix)
        if self.open_layers:
            return
        missing = sorted(self.expected - self.loaded)
        if missing:
            raise PreparedCheckpointMismatch(
                f"moeprep: {missing[0]} (and {len(missing) - 1} more prepared tensors) in the manifest was not "
                "loaded: the model vLLM built has no such parameter; convert again for this model and vLLM"
            )
