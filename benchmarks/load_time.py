"""vLLM load time and GPU memory, original gpt-oss checkpoint vs moeprep-prepared, both in the same page-cache state.

    python benchmarks/load_time.py --preset 120b --layers 4 --backend triton --rounds 2 --budget auto --out r.json
    python benchmarks/load_time.py --preset 120b --layers max --backend triton --rounds 1 --budget auto  # deepest

On a GPU host with vLLM (a bundle from ../shared/gpu-vllm*, plugin registered by tests/gpu/register_plugin.py).
Builds a synthetic gpt-oss checkpoint with real expert dims (E=128, H=I=2880 for 120b) unless the work folder
already holds one, converts it on the GPU, then loads each checkpoint in a fresh process with vLLM's ``LLM`` in
two page-cache states per round:

- cold: both checkpoints' files evicted (``fsync`` + ``posix_fadvise(DONTNEED)``, checked with ``mincore``);
- warm: both read fully first (checked the same way).

Each load reports vLLM's "Loading weights took" / "Model loading took", MoE post-processing
(``process_weights_after_loading``), time to a ready engine, peak and final GPU memory of the load, and 4 x 32
greedy tokens; beside it the plain read time of the same files in the same state (the I/O floor). The order of
the two checkpoints alternates between rounds. The KV cache is fixed (1 GiB) so that both engines do the same
work after loading.

Also measured once per run:
- convert then serve: the prepared folder loaded as the converter left it (source evicted before converting),
  against the original's cold load;
- ``--budget``: both loaded under a GPU memory cap (``torch.cuda.set_per_process_memory_fraction`` in the engine
  process) that the final weights fit but the original's load-time transient does not (``auto``: halfway between
  what the prepared engine needs and what the original's load needs): the original is expected to fail, the
  prepared folder to give its tokens.

``--sleep-mode`` loads every engine with vLLM's sleep mode (``enable_sleep_mode``: weights in vLLM's cumem pool,
where vLLM #34877 saw gpt-oss-120b run out of memory) and, after the greedy tokens, puts it to sleep (level 1),
wakes it and generates again: the free GPU memory while asleep and whether the tokens after waking are the same
are recorded. ``--start-round`` continues an earlier run's alternation (round 1 loads the other side first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import page_cache  # noqa: E402

from moeprep.fixtures.tokenizer import SAMPLE_PROMPTS as PROMPTS  # noqa: E402

LOG_PATTERNS = {
    "loading_weights_s": r"Loading weights took ([\d.]+) seconds",
    "model_loading_s": r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds",
}
KV_CACHE_BYTES = 2**30
METRICS = (
    "io_floor_s",
    "loading_weights_s",
    "model_loading_s",
    "post_processing_s",
    "engine_ready_s",
    "load_peak_gib",
    "loaded_weights_gib",
)


def child_load(model: str, out: Path, moe_backend: str | None, budget_gib: float | None, sleep_mode: bool) -> None:
    """Load ``model`` in this process, timing vLLM's post-processing and tracking peak GPU memory; under
    ``budget_gib`` the process may allocate at most that much GPU memory; with ``sleep_mode`` a sleep/wake cycle
    follows the greedy tokens."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader import base_loader

    facts: dict[str, float | str] = {}
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
        facts["load_peak_allocated_abs_gib"] = torch.cuda.max_memory_allocated() / 2**30
        facts["load_peak_reserved_abs_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return model

    base_loader.process_weights_after_loading = timed_post
    base_loader.BaseModelLoader.load_model = tracked_load
    if budget_gib:
        torch.cuda.set_per_process_memory_fraction(
            budget_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory
        )
    kwargs: dict = {"moe_backend": moe_backend} if moe_backend else {}
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    start = time.perf_counter()
    try:
        llm = LLM(
            model,
            max_model_len=512,
            gpu_memory_utilization=0.85,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            enforce_eager=True,
            seed=0,
            **kwargs,
        )
    except Exception as error:  # the budget run records the failure instead of raising it
        out.write_text(json.dumps({**facts, "failed": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}))
        raise SystemExit(3) from error
    facts["engine_ready_s"] = time.perf_counter() - start
    # what a cap must leave room for: vLLM resets the peak counters when it profiles, so the load's peak is kept apart
    facts["engine_peak_reserved_gib"] = max(
        facts["load_peak_reserved_abs_gib"], torch.cuda.max_memory_reserved() / 2**30
    )
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = greedy_tokens(llm, params)
    if sleep_mode:
        facts.update(sleep_wake_cycle(llm, params, tokens))
    out.write_text(json.dumps({**facts, "tokens": tokens}))


def greedy_tokens(llm, params) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The greedy tokens of each sample prompt, generated one prompt at a time."""
    return [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in PROMPTS]


def sleep_wake_cycle(llm, params, tokens: list[list[int]]) -> dict:  # type: ignore[no-untyped-def]
    """Put the engine to sleep (level 1: weights offloaded to CPU, KV cache dropped), wake it, generate again."""
    import torch

    free_awake = torch.cuda.mem_get_info()[0]
    llm.sleep(level=1)
    free_asleep = torch.cuda.mem_get_info()[0]
    llm.wake_up()
    return {
        "freed_by_sleep_gib": (free_asleep - free_awake) / 2**30,
        "tokens_after_wake_identical": greedy_tokens(llm, params) == tokens,
    }


def load_in_subprocess(model: Path, name: str, args: argparse.Namespace, budget_gib: float | None = None) -> dict:
    """One load in a fresh process: its facts, vLLM's own timings from its log, or ``failed``."""
    out, log = args.workdir / f"{name}.json", args.workdir / f"{name}.log"
    out.unlink(missing_ok=True)
    child = [str(model), str(out), args.moe_backend or "-", str(budget_gib or 0), "1" if args.sleep_mode else "0"]
    cmd = [sys.executable, __file__, "--child", *child]
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if not out.exists():
        raise SystemExit(f"loading {model} failed:\n{text[-3000:]}")
    facts = json.loads(out.read_text())
    facts["exit_code"] = code
    for key, pattern in LOG_PATTERNS.items():
        match = re.search(pattern, text)
        facts[key] = float(match.group(1)) if match else None
    return facts


def set_state(files: list[Path], mode: str) -> dict[str, float]:
    """Put ``files`` in ``mode`` (cold/warm); time a plain read of them in that state (the I/O floor), then restore
    the state and check it."""
    if mode == "cold":
        page_cache.evict(files)
        floor = page_cache.read_all(files)
        left = page_cache.evict(files)
    else:
        page_cache.warm(files)
        floor = page_cache.read_all(files)
        left = page_cache.resident_fraction(files)
    return {"io_floor_s": floor, "resident_before_load": left}


def most_layers_on_disk(preset: str, workdir: Path, headroom: float = 0.9) -> int:
    """As many layers as the work folder's disk holds an original and a prepared copy of (``headroom`` of the free
    space; a prepared folder is taken as 5% larger than its original for padding), after clearing the work folder
    of earlier checkpoints."""
    from moeprep.fixtures import fixture_bytes

    if workdir.exists():
        for old in [*workdir.glob("original-*"), *workdir.glob("prepared-*")]:
            shutil.rmtree(old)
    workdir.mkdir(parents=True, exist_ok=True)
    one, two = fixture_bytes("gpt-oss", preset, 1), fixture_bytes("gpt-oss", preset, 2)
    per_layer, fixed = two - one, 2 * one - two
    free = shutil.disk_usage(workdir).free * headroom / 2.05
    layers = int((free - fixed) // per_layer)
    if layers < 1:
        raise SystemExit(f"{workdir}: too little free disk for one layer of each checkpoint")
    return layers


def prepare(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """The original and prepared folders (built and converted unless the work folder holds them) and the facts of
    building them, including the convert-then-serve load."""
    from moeprep.convert import convert, load_plan
    from moeprep.fixtures import build_fixture
    from moeprep.plan import PlanOptions

    args.workdir.mkdir(parents=True, exist_ok=True)
    src, prepared = args.workdir / f"original-{args.preset}-{args.layers}l", args.workdir / f"prepared-{args.backend}"
    facts: dict = {}
    if not (src / "model.safetensors.index.json").exists() and not (src / "model.safetensors").exists():
        start = time.perf_counter()
        build_fixture("gpt-oss", src, preset=args.preset, num_layers=args.layers, overwrite=True)
        facts["fixture_s"] = time.perf_counter() - start
    page_cache.evict(page_cache.checkpoint_files(src))
    start = time.perf_counter()
    source, plan = load_plan(str(src), args.backend, options=PlanOptions(device="cuda"))
    convert(source, plan, prepared, overwrite=True)
    facts["convert_cold_source_s"] = time.perf_counter() - start
    files = page_cache.checkpoint_files(prepared)
    facts["prepared_resident_after_convert"] = page_cache.resident_fraction(files)
    facts["checkpoint_gb"] = sum(p.stat().st_size for p in page_cache.checkpoint_files(src)) / 1e9
    facts["load_after_convert"] = load_in_subprocess(prepared, "prepared-after-convert", args)
    return src, prepared, facts


def summarize(loads: list[dict]) -> dict:
    """Median, min and max of each metric over rounds."""
    summary = {}
    for key in METRICS:
        values = [load[key] for load in loads if load.get(key) is not None]
        if values:
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def table(result: dict) -> str:
    """The fair table as markdown: per mode, original and prepared medians (min-max) and their ratio."""
    lines = ["| mode | metric | original | prepared | prepared / original |", "|---|---|---|---|---|"]
    for mode, sides in result["modes"].items():
        for key in METRICS:
            if key not in sides["original"] or key not in sides["prepared"]:
                continue
            o, p = sides["original"][key], sides["prepared"][key]
            ratio = p["median"] / o["median"] if o["median"] else float("nan")
            cell = "{median:.3f} ({min:.3f}-{max:.3f})"
            lines.append(f"| {mode} | {key} | {cell.format(**o)} | {cell.format(**p)} | {ratio:.3f} |")
    return "\n".join(lines)


def merged(paths: list[Path]) -> dict:
    """The loads of several runs of one setup (e.g. a run and its ``--start-round 1`` continuation) summarized
    together, in the shape ``table`` reads."""
    loads: dict[str, dict[str, list[dict]]] = {}
    for path in paths:
        for mode, sides in json.loads(path.read_text())["loads"].items():
            for side, runs in sides.items():
                loads.setdefault(mode, {}).setdefault(side, []).extend(runs)
    return {"modes": {mode: {side: summarize(runs) for side, runs in sides.items()} for mode, sides in loads.items()}}


def run(args: argparse.Namespace) -> dict:
    src, prepared, facts = prepare(args)
    folders = {"original": src, "prepared": prepared}
    files = {side: page_cache.checkpoint_files(folder) for side, folder in folders.items()}
    loads: dict[str, dict[str, list[dict]]] = {m: {"original": [], "prepared": []} for m in args.modes}
    tokens: dict[str, list] = {}
    for round_ in range(args.start_round, args.start_round + args.rounds):
        modes = args.modes if round_ % 2 == 0 else args.modes[::-1]
        for mode in modes:
            first = (round_ + args.modes.index(mode)) % 2 == 0  # each mode alternates which side loads first
            order = ["original", "prepared"] if first else ["prepared", "original"]
            for side in order:
                state = set_state(files[side], mode)
                load = load_in_subprocess(folders[side], f"{side}-{mode}-{round_}", args)
                if load["exit_code"]:
                    raise SystemExit(f"{side} failed to load: {load.get('failed')}")
                tokens.setdefault(side, load.pop("tokens"))
                load.pop("tokens", None)
                loads[mode][side].append({**load, **state, "round": round_, "position": order.index(side)})
                print(f"round {round_} {mode} {side}: {json.dumps(loads[mode][side][-1])}", flush=True)
                if args.out:  # a run cut short keeps the loads it finished
                    args.out.write_text(json.dumps({"partial": True, **facts, "loads": loads}, indent=1) + "\n")
    result = {
        "preset": args.preset,
        "layers": args.layers,
        "backend": args.backend,
        "moe_backend": args.moe_backend,
        "rounds": args.rounds,
        "start_round": args.start_round,
        "sleep_mode": args.sleep_mode,
        **facts,
        "tokens_identical": tokens["original"] == tokens["prepared"],
        "loads": loads,
        "modes": {mode: {side: summarize(runs) for side, runs in sides.items()} for mode, sides in loads.items()},
    }
    after = facts["load_after_convert"]
    result["load_after_convert_tokens_identical"] = after.pop("tokens", None) == tokens["original"]
    if "cold" in loads:
        cold_original = result["modes"]["cold"]["original"]["model_loading_s"]["median"]
        result["convert_then_serve_vs_original_cold"] = {
            "prepared_model_loading_s": after["model_loading_s"],
            "original_cold_model_loading_s": cold_original,
            "convert_plus_prepared_load_s": facts["convert_cold_source_s"] + after["model_loading_s"],
        }
    if args.budget:
        result["budget"] = budget_run(args, folders, files, loads, tokens["original"])
    return result


def budget_run(args: argparse.Namespace, folders: dict, files: dict, loads: dict, reference: list) -> dict:
    """Both checkpoints loaded (warm) under a GPU memory cap. ``auto`` puts the cap halfway between the most the
    prepared engine reserved (load, profiling and KV cache) and the least the original's load allocated at its
    peak; where the first is not below the second no cap separates them, and that is recorded instead."""
    runs = {side: [run for mode in loads.values() for run in mode[side]] for side in folders}
    prepared_needs = max(run["engine_peak_reserved_gib"] for run in runs["prepared"])
    original_needs = min(run["load_peak_allocated_abs_gib"] for run in runs["original"])
    outcome: dict = {"prepared_engine_peak_reserved_gib": prepared_needs, "original_load_peak_gib": original_needs}
    if args.budget == "auto" and prepared_needs >= original_needs:
        return {**outcome, "separable": False}
    budget = (prepared_needs + original_needs) / 2 if args.budget == "auto" else float(args.budget)
    outcome["budget_gib"] = budget
    for side in ("original", "prepared"):
        set_state(files[side], "warm")
        load = load_in_subprocess(folders[side], f"{side}-budget", args, budget)
        outcome[side] = {
            "served": load["exit_code"] == 0,
            "failed": load.get("failed"),
            "load_peak_gib": load.get("load_peak_gib"),
            "tokens_identical_to_unconstrained_original": load.get("tokens") == reference,
            "tokens_after_wake_identical": load.get("tokens_after_wake_identical"),
        }
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="120b")
    parser.add_argument(
        "--layers", default="4", help="MoE layers, or max: as many as the disk holds an original and a prepared copy of"
    )
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--moe-backend", default=None, help="vLLM moe_backend for both loads (e.g. marlin)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--start-round", type=int, default=0, help="index of the first round (continues a run)")
    parser.add_argument("--sleep-mode", action="store_true", help="vLLM sleep mode and a sleep/wake cycle per load")
    parser.add_argument("--modes", default="cold,warm", type=lambda s: s.split(","))
    parser.add_argument("--budget", default=None, help="GiB, or auto: a GPU memory cap for one more pair of loads")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeprep-load"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", help="print the table of these result files' loads together")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge:
        print(table(merged(args.merge)))
        return
    if args.child:
        model, out, moe_backend, budget, sleep = args.child
        child_load(model, Path(out), None if moe_backend == "-" else moe_backend, float(budget) or None, sleep == "1")
        return
    if set(args.modes) - {"cold", "warm"}:
        parser.error("--modes takes cold and/or warm")
    args.layers = most_layers_on_disk(args.preset, args.workdir) if args.layers == "max" else int(args.layers)
    print(f"{args.layers} layers", flush=True)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "loads"}, indent=1))
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not result["tokens_identical"]:
        raise SystemExit("greedy tokens differ between original and prepared checkpoints")


if __name__ == "__main__":
    main()
