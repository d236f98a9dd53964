"""Every error moeprep raises on purpose, in one hierarchy (standard library only: the plugin imports it too).
The CLI turns every MoeprepError into a one-line message and its ``exit_code``; inside vLLM, the plugin's
``PreparedCheckpointMismatch`` is also a ValueError, which vLLM reports as a bad model."""

from typing import ClassVar


def option(name: str, value: object = None) -> str:
    """An option of moeprep's Python API (``load_plan``/``PlanOptions``/``convert`` argument) named in a message:
    ``option("tp_size", 3)`` is "`tp_size=3`", the keyword argument a caller passes, ``option("arch")`` "`arch`".
    Messages name options only so; the CLI shows each as its flag (``--tp 3``, ``--arch``)."""
    return f"`{name}`" if value is None else f"`{name}={value!r}`"


class MoeprepError(Exception):
    """Base class: a problem the user can fix; the message names the file or tensor and the fix."""

    exit_code: ClassVar[int] = 2  # the CLI's exit code: bad input, nothing written


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


class LoraError(MoeprepError):
    """A LoRA adapter is malformed, unsupported, or does not fit the base it is prepared for."""


class HubError(MoeprepError):
    """The Hub refused a request or could not be reached."""


class PreparedCheckpointMismatch(MoeprepError, ValueError):
    """The plugin refuses a prepared folder: it does not fit the running vLLM, GPU or options."""
