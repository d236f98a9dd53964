"""``moeprep doctor [FOLDER]``: what this machine's vLLM makes of moeprep's layouts.

Reports the installed vLLM, where ``--backend auto`` would target, and the private vLLM hooks the plugin uses;
then proves layouts against the installed vLLM (``layout_check``): the folder's, or each one vLLM's transform can
run for here. A folder outside its verified vLLM ranges is served by the plugin only when this check passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from moeprep.errors import UnsupportedModelError
from moeprep.layout_check import VLLM_TRANSFORMS, CannotCheck, LayoutCheck, check_layout
from moeprep.schema.vllm_versions import in_ranges, installed_vllm, served_vllm


def describe_check(check: LayoutCheck) -> Iterator[str]:
    yield f"{check.backend} {check.arch}: vLLM's own transform of a random layer (seed {check.seed}):"
    for name, same in check.equal.items():
        yield f"  {name}: {'bitwise equal' if same else 'DIFFERS'}"


def machine_lines() -> Iterator[str]:
    """The installed vLLM, the ``--backend auto`` target, and the plugin's vLLM hooks."""
    from moeprep.auto_backend import serving_target

    installed = installed_vllm()
    yield f"vLLM: {installed[0]} ({installed[1]})" if installed else "vLLM: not installed"
    try:
        yield f"serving target: {serving_target(None, None).described}"
    except UnsupportedModelError as exc:
        yield f"serving target: unknown ({exc})"
    if installed:
        from moeprep.runtime.vllm_compat import missing_hooks

        missing = missing_hooks()
        yield "vLLM hooks the plugin uses: " + (f"missing {', '.join(missing)}" if missing else "all present")


def local_arches() -> list[tuple[str, str]]:
    """(backend, arch) pairs whose vLLM transform could run on this machine."""
    import torch

    pairs = [("cpu", "any")]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        pairs = [("marlin", "any"), *([("triton", f"sm{major}{minor}")] if (major, minor) in ((9, 0), (10, 0)) else [])]
    return pairs


def run_checks(pairs: list[tuple[str, str]]) -> tuple[list[str], str | None]:
    """The checks' report lines, and the first tensor that differs (None: none did)."""
    lines, failure = [], None
    for backend, arch in pairs:
        try:
            check = check_layout(backend, arch)
        except CannotCheck as exc:
            lines.append(f"{backend} {arch}: not checked here ({exc})")
            continue
        lines.extend(describe_check(check))
        if check.first_mismatch and failure is None:
            failure = f"{backend} {arch} layout: {check.first_mismatch} differs from vLLM's own transform"
    return lines, failure


def doctor(folder: Path | None) -> tuple[list[str], str | None]:
    """The report's lines, and the first failure (None: nothing failed)."""
    lines = list(machine_lines())
    if folder is None:
        check_lines, failure = run_checks([p for p in local_arches() if p[0] in VLLM_TRANSFORMS])
        return lines + check_lines, failure
    from moeprep.modelcard import serve_command
    from moeprep.plan import serve_flags
    from moeprep.schema.manifest import load_manifest

    manifest = load_manifest(folder)
    target, installed = manifest.target, installed_vllm()
    lines.append(f"folder: backend {target.backend}, recipe {target.recipe}, verified for vLLM {served_vllm(target)}")
    if installed and target.locked_to_vllm:
        inside = in_ranges(installed[0], target.served_vllm_ranges)
        lines.append(f"installed vLLM {installed[0]}: {'in' if inside else 'OUTSIDE'} the verified ranges")
    check_lines, failure = run_checks([(target.backend, str(target.knobs.get("arch", "any")))])
    lines += [
        *check_lines,
        "serve with:",
        serve_command(str(folder), target, {"serve_flags": serve_flags(target.backend)}),
    ]
    return lines, failure
