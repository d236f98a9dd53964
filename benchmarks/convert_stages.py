"""Where a conversion's time goes: each pipeline stage alone, as a ratio to the whole conversion, in one run.

    python benchmarks/convert_stages.py --preset 120b --layers 4 [--device cuda]

Uses the synthetic gpt-oss checkpoint of ``convert_throughput.py`` (built under --workdir if missing) and
times, each in a fresh subprocess: the whole ``convert``; hashing the source files as a conversion does
(``hashing_weight_files``); producing every output chunk (read + layout transform on --device) without
writing; writing and hashing as many bytes with moeprep's writer (its file sink and sha256 trees) from one
reused chunk on --device (so with cuda the copies back from the GPU are in this stage). A stage that alone
takes nearly the whole conversion is the bound; stages that each take much less than the whole, together,
point at poor overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGES = ("convert", "hash_source", "produce", "write")


def run_stage(stage: str, src: Path, dest: Path, device: str) -> float:
    """Seconds for ``stage`` alone (torch imported before the clock starts, as in every stage)."""
    from moeprep.checkpoint.pipeline import use_huge_page_buffers

    use_huge_page_buffers()
    import torch

    from moeprep.checkpoint.file_sink import flat_bytes
    from moeprep.checkpoint.safetensors_io import TensorEntry, write_safetensors
    from moeprep.convert import convert, load_plan
    from moeprep.plan import PlanOptions

    source, plan = load_plan(str(src), "triton", options=PlanOptions(device=device))
    start = time.perf_counter()
    if stage == "convert":
        convert(source, plan, dest, overwrite=True)
    elif stage == "hash_source":
        with source.hashing_weight_files():
            for file in source.weight_files:
                source.file_sha256(file)
    elif stage == "produce":
        for job in plan.jobs:
            produced = job.run(source)
            for chunk in [produced] if isinstance(produced, torch.Tensor) else produced:
                flat_bytes(chunk)
        if device == "cuda":
            torch.cuda.synchronize()
    else:  # write: the output's bytes, one reused chunk
        chunk = torch.randint(0, 256, (48 << 20,), dtype=torch.uint8, device=device)
        count = plan.total_bytes // chunk.numel()
        entry = TensorEntry("bytes", "U8", (count * chunk.numel(),))
        dest.mkdir(parents=True, exist_ok=True)
        write_safetensors(dest / "write.safetensors", [entry], lambda _: iter([chunk] * count))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="120b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeprep-bench"))
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, src, dest, device = args.child
        print(json.dumps({"seconds": run_stage(stage, Path(src), Path(dest), device)}))
        return

    from convert_throughput import synthetic_gpt_oss

    src = synthetic_gpt_oss(args.workdir, args.preset, args.layers)
    seconds = {}
    for stage in STAGES:
        command = [sys.executable, __file__, "--child", stage, str(src), str(args.workdir / f"stage-{stage}")]
        out = subprocess.run([*command, args.device], capture_output=True, text=True, check=True)
        seconds[stage] = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        shutil.rmtree(args.workdir / f"stage-{stage}", ignore_errors=True)
    result = {
        "preset": args.preset,
        "layers": args.layers,
        "device": args.device,
        "cpu_threads": os.cpu_count(),
        "seconds": seconds,
        "ratio_to_convert": {stage: s / seconds["convert"] for stage, s in seconds.items()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
