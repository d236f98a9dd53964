"""vLLM load time and peak GPU memory, original gpt-oss checkpoint vs moeprep-prepared, in one run.

    python benchmarks/load_time.py --preset 120b --layers 6 [--backend triton] [--out result.json]

On a GPU host with vLLM 0.26 (bundle from ../shared/gpu-vllm, plugin registered by
tests/gpu/register_plugin.py). Builds a synthetic gpt-oss checkpoint with real expert dims
(E=128, H=I=2880 for 120b), converts it (``--device cuda``, timed against copying the files),
then loads each checkpoint in a fresh process with vLLM's ``LLM`` and reports vLLM's own
"Loading weights took" / "Model loading took", the time of MoE post-processing
(``process_weights_after_loading``), peak GPU memory during the load, and 4 x 32 greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeprep.fixtures.tokenizer import SAMPLE_PROMPTS as PROMPTS  # noqa: E402

LOG_PATTERNS = {
    "loading_weights_s": r"Loading weights took ([\d.]+) seconds",
    "model_loading_s": r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds",
}


def child_load(model: str, out: Path, moe_backend: str | None) -> None:
    """Load ``model`` in this process, timing vLLM's post-processing and tracking peak GPU memory."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader import base_loader

    facts: dict[str, float] = {}
    original_post = base_loader.process_weights_after_loading
    original_load = base_loader.BaseModelLoader.load_model

    def timed_post(*args, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        start = time.perf_counter()
        original_post(*args, **kwargs)
        torch.cuda.synchronize()
        facts["post_processing_s"] = time.perf_counter() - start

    def tracked_load(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = original_load(self, *args, **kwargs)
        torch.cuda.synchronize()
        facts["load_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        facts["loaded_weights_gib"] = (torch.cuda.memory_allocated() - base) / 2**30
        return model

    base_loader.process_weights_after_loading = timed_post
    base_loader.BaseModelLoader.load_model = tracked_load
    kwargs = {"moe_backend": moe_backend} if moe_backend else {}
    start = time.perf_counter()
    llm = LLM(model, max_model_len=512, gpu_memory_utilization=0.85, enforce_eager=True, seed=0, **kwargs)
    facts["engine_ready_s"] = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in PROMPTS]
    out.write_text(json.dumps({**facts, "tokens": tokens}))


def load_in_subprocess(model: Path, out: Path, log: Path, moe_backend: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model), str(out)] + ([moe_backend] if moe_backend else [])
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if code:
        raise SystemExit(f"loading {model} failed:\n{text[-3000:]}")
    facts = json.loads(out.read_text())
    for key, pattern in LOG_PATTERNS.items():
        match = re.search(pattern, text)
        facts[key] = float(match.group(1)) if match else None
    return facts


def timed(fn, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="120b")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--moe-backend", default=None, help="vLLM moe_backend for both loads (e.g. marlin)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeprep-load"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_load(args.child[0], Path(args.child[1]), args.child[2] if len(args.child) > 2 else None)
        return

    from moeprep.convert import convert, load_plan
    from moeprep.fixtures import build_fixture
    from moeprep.plan import PlanOptions

    args.workdir.mkdir(parents=True, exist_ok=True)
    src, prepared = args.workdir / "original", args.workdir / f"prepared-{args.backend}"
    fixture_s = timed(build_fixture, "gpt-oss", src, preset=args.preset, num_layers=args.layers, overwrite=True)
    copy_s = timed(shutil.copytree, src, args.workdir / "copy", dirs_exist_ok=True)
    source, plan = load_plan(str(src), args.backend, options=PlanOptions(device="cuda"))
    convert_s = timed(convert, source, plan, prepared, overwrite=True)
    size_gb = sum(p.stat().st_size for p in src.iterdir()) / 1e9
    original = load_in_subprocess(src, args.workdir / "original.json", args.workdir / "original.log", args.moe_backend)
    ready = load_in_subprocess(
        prepared, args.workdir / "prepared.json", args.workdir / "prepared.log", args.moe_backend
    )
    layer_gib = size_gb * 1e9 / args.layers / 2**30
    result = {
        "preset": args.preset,
        "layers": args.layers,
        "backend": args.backend,
        "checkpoint_gb": size_gb,
        "fixture_s": fixture_s,
        "copy_s": copy_s,
        "convert_cuda_s": convert_s,
        "convert_cuda_gb_per_s": size_gb / convert_s,
        "convert_to_copy": convert_s / copy_s,
        "original": {k: v for k, v in original.items() if k != "tokens"},
        "prepared": {k: v for k, v in ready.items() if k != "tokens"},
        "tokens_identical": original["tokens"] == ready["tokens"],
        "prepared_post_processing_over_weight_load": ready["post_processing_s"] / ready["loading_weights_s"]
        if ready.get("loading_weights_s")
        else None,
        "one_layer_gib": layer_gib,
        "prepared_peak_minus_final_gib": ready["load_peak_gib"] - ready["loaded_weights_gib"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not result["tokens_identical"]:
        raise SystemExit("greedy tokens differ between original and prepared checkpoints")


if __name__ == "__main__":
    main()
