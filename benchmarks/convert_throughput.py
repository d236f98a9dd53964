"""Conversion wall time and peak RSS against copying the same checkpoint files, in one run.

    python benchmarks/convert_throughput.py --preset 120b --layers 4 --backend triton [--device cuda]

Builds a synthetic gpt-oss checkpoint (real expert dims, E=128, H=I=2880 for 120b) once under
--workdir, then times, each in a fresh subprocess and alternating for --rounds: copying its files
(the baseline) and ``moeprep convert``. Prints the ratio of the medians and each side's peak RSS; for the
conversion also the time in ``convert`` itself and the process startup before it (imports, CUDA context).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child_copy(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        shutil.copyfile(path, dest / path.name)
        with (dest / path.name).open("rb+") as f:
            os.fsync(f.fileno())


def child_convert(src: Path, dest: Path, backend: str, device: str) -> dict[str, float]:
    """Convert as the ``moeprep`` command does; returns the seconds spent in ``convert`` itself (the rest of the
    process's time is importing torch and, with --device cuda, starting CUDA: a cost per run, not per byte)."""
    from moeprep.checkpoint.pipeline import use_huge_page_buffers

    use_huge_page_buffers()  # as the moeprep command does, before torch is imported
    import torch

    from moeprep.convert import convert, load_plan
    from moeprep.plan import PlanOptions

    if device == "cuda":
        torch.zeros(1, device=device).sum().item()
    source, plan = load_plan(str(src), backend, options=PlanOptions(device=device))
    start = time.perf_counter()
    convert(source, plan, dest, overwrite=True)
    return {"convert_call_seconds": time.perf_counter() - start}


def own_peak_rss_kib() -> int:
    """This process's peak RSS since its exec (``VmHWM``). ``ru_maxrss`` would not do: Linux carries the
    parent's peak over into a child it spawns, and the parent here built the checkpoint."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def synthetic_gpt_oss(workdir: Path, preset: str, layers: int) -> Path:
    """The synthetic gpt-oss checkpoint (real expert dims) under ``workdir``, built once."""
    from moeprep.fixtures import build_fixture

    src = workdir / f"gpt-oss-{preset}-{layers}l"
    if not (src / "config.json").exists():
        build_fixture("gpt-oss", src, preset=preset, num_layers=layers, overwrite=True)
    return src


def run_child(dest: Path, *args: str) -> dict[str, float]:
    """Run this script as a child doing one job that writes ``dest``; returns its wall time and peak RSS.
    The previous round's ``dest`` is deleted first, outside the timing (unlinking GBs is disk work too)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="120b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeprep-bench"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating copy/convert rounds (medians reported)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        start = time.perf_counter()
        job, *rest = args.child
        if job == "copy":
            child_copy(Path(rest[0]), Path(rest[1]))
            parts = {}
        else:
            parts = child_convert(Path(rest[0]), Path(rest[1]), rest[2], rest[3])
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mib": own_peak_rss_kib() / 1024, **parts}))
        return

    src = synthetic_gpt_oss(args.workdir, args.preset, args.layers)
    copies, converts = [], []
    copy, prepared = args.workdir / "copy", args.workdir / "prepared"
    for _ in range(args.rounds):  # alternate, so disk writeback state hits both sides alike
        copies.append(run_child(copy, "copy", str(src), str(copy)))
        converts.append(run_child(prepared, "convert", str(src), str(prepared), args.backend, args.device))
    copy_s = statistics.median(c["seconds"] for c in copies)
    convert_s = statistics.median(c["seconds"] for c in converts)
    convert_call_s = statistics.median(c["convert_call_seconds"] for c in converts)
    size = folder_bytes(src)
    result = {
        "preset": args.preset,
        "layers": args.layers,
        "backend": args.backend,
        "device": args.device,
        "source_gb": size / 1e9,
        "rounds": args.rounds,
        "copy_s_median": copy_s,
        "convert_s_median": convert_s,
        "ratio_convert_to_copy": convert_s / copy_s,
        "convert_gb_per_s": size / 1e9 / convert_s,
        "convert_call_s_median": convert_call_s,
        "convert_call_gb_per_s": size / 1e9 / convert_call_s,
        "startup_s_median": statistics.median(c["seconds"] - c["convert_call_seconds"] for c in converts),
        "copy_s_all": [c["seconds"] for c in copies],
        "convert_s_all": [c["seconds"] for c in converts],
        "convert_call_s_all": [c["convert_call_seconds"] for c in converts],
        "copy_peak_rss_mib": max(c["peak_rss_mib"] for c in copies),
        "convert_peak_rss_mib": max(c["peak_rss_mib"] for c in converts),
        "cpu_threads": os.cpu_count(),
    }
    shutil.rmtree(copy, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
