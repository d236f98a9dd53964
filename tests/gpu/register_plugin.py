"""Make this source tree's vLLM plugin visible on a host where moeprep cannot be pip-installed:
writes a ``moeprep`` dist-info with the ``vllm.general_plugins`` entry point into SITE (on PYTHONPATH)."""

from __future__ import annotations

import sys
from pathlib import Path

from moeprep import __version__


def register(site: Path) -> Path:
    info = site / f"moeprep-{__version__}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: moeprep\nVersion: {__version__}\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nmoeprep = moeprep.runtime:register\n")
    return info


if __name__ == "__main__":
    print(register(Path(sys.argv[1])))
