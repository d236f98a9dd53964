"""Typed errors. The CLI turns every MoeprepError into a one-line message and exit code 2."""


class MoeprepError(Exception):
    """Base class: a problem the user can fix; the message names the file or tensor and the fix."""


class CheckpointError(MoeprepError):
    """A checkpoint file is missing, truncated, corrupt or has an unexpected tensor."""


class UnsupportedModelError(MoeprepError):
    """The architecture (model_type) or an option is not supported."""


class ManifestError(MoeprepError):
    """moeprep.json is missing, malformed, or does not match the files it describes."""


class VerificationError(MoeprepError):
    """A prepared file or tensor does not hash to what the manifest records."""


class OutputError(MoeprepError):
    """The output folder cannot be written (exists, disk full, permissions)."""
