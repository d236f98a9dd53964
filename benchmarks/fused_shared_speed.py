"""Fused shared experts vs the original MoE block in vLLM: TTFT and TPOT at several batch sizes, one run.

    python benchmarks/fused_shared_speed.py --family deepseek-v3 --preset v3 --layers 3 --out results.json

On a GPU host with vLLM 0.26 (bundle from ../shared/gpu-vllm, plugin registered by
tests/gpu/register_plugin.py). Real expert dims at a few layers; the weights are vLLM's dummy (random)
weights, since a bf16 DeepSeek-V3 MoE layer alone is 22.5 GB: the original folder holds the config and
tokenizer, the fused folder the same plus moeprep's prepared config and manifest with the routing
contract, exactly as ``moeprep convert --fuse-shared-experts`` writes them. Each model is measured in a
fresh process with CUDA graphs on, driving vLLM's engine step by step: TTFT = time from adding a batch
of requests to the first step that returns tokens (median of ``--repeats``), TPOT = median interval
between later token-returning steps (each a decode step of the whole batch), after decoding for
``--warmup-s`` seconds (GPU clocks up) and one warm-up batch at each size. The two models alternate over
``--rounds`` (original, fused, fused, original, ...: a drift over the run or a slow first process falls on
both): each model's time is the median over its rounds, and the spread of the original's own rounds
(max / min - 1) is the noise floor printed beside the fused / original ratio. ``--one-process`` starts both
models in one process instead (two engines, 45% of the GPU's memory each) and alternates them round by round
there, so what varies from process to process (clocks, memory placement) cannot fall on one model only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def weightless_folders(
    family_name: str, preset: str, layers: int, replicas: int, quantization: str, root: Path
) -> dict[str, Path]:
    """``original`` (config + tokenizer) and ``fused`` (prepared config + manifest) folders, no weights."""
    from moeprep.checkpoint.manifest import Manifest, Source, write_manifest
    from moeprep.checkpoint.writer import write_json
    from moeprep.convert import _file_record, prepared_config
    from moeprep.families import get_family
    from moeprep.fixtures.build import fixture_config
    from moeprep.fixtures.tokenizer import write_word_tokenizer
    from moeprep.plan import backend_target
    from moeprep.shared_experts import check_fusable, routing_contract

    family = get_family(family_name)
    config = fixture_config(family_name, preset, layers, quantization)
    moe = family.moe_spec(config)
    check_fusable(family, moe, replicas)
    folders = {"original": root / "original", "fused": root / "fused"}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_word_tokenizer(folder, config["vocab_size"], config.get("max_position_embeddings", 2048))
    write_json(folders["original"] / "config.json", config)
    target = backend_target("none", None)
    routing = {"fused_shared_experts": routing_contract(family, moe, config, replicas)}
    fused = folders["fused"]
    write_json(fused / "config.json", prepared_config(config, target, routing))
    files = {p.name: _file_record(p) for p in sorted(fused.iterdir())}
    source = Source("local", f"synthetic {family_name} {preset} ({layers} layers)", None, {})
    manifest = Manifest("bench", config["model_type"], config["architectures"], source, target, files, {}, routing)
    write_manifest(fused, manifest)
    return folders


RunBatch = Callable[[int], tuple[float, list[float]]]


def batch_runner(model: str, batches: list[int], input_len: int, output_len: int, gpu_share: float) -> RunBatch:
    """Start vLLM on ``model`` (dummy weights, ``gpu_share`` of the GPU's memory); returns ``run_batch(n)``:
    n requests at once, (time to the first step that returns tokens, the intervals between later such steps)."""
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model,
        load_format="dummy",
        max_model_len=input_len + output_len + 8,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(batches) * input_len,
        gpu_memory_utilization=gpu_share,
        enable_prefix_caching=False,
        seed=0,
    )
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    request_ids = itertools.count()

    def run_batch(batch: int) -> tuple[float, list[float]]:
        ids = torch.randint(8, vocab, (batch, input_len), generator=gen).tolist()
        start = time.perf_counter()
        for row in ids:
            engine.add_request(f"r{next(request_ids)}", {"prompt_token_ids": row}, params)
        stamps = []
        while engine.has_unfinished_requests():
            if engine.step():
                stamps.append(time.perf_counter())
        return stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)]

    return run_batch


def warm_up(run_batch: RunBatch, batches: list[int], seconds: float) -> None:
    """Decode at the largest batch for ``seconds`` (GPU clocks up), then once at each batch size."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_batch(max(batches))
    for batch in batches:
        run_batch(batch)


def measure_batches(run_batch: RunBatch, batches: list[int], repeats: int) -> dict[str, dict]:
    """``{batch: {ttft_ms, tpot_ms, tpot_p10_p90_ms}}``, medians over ``repeats`` batches of each size."""
    results = {}
    for batch in batches:
        runs = [run_batch(batch) for _ in range(repeats)]
        steps = sorted(step for _, intervals in runs for step in intervals)
        results[str(batch)] = {
            "ttft_ms": 1e3 * statistics.median(first for first, _ in runs),
            "tpot_ms": 1e3 * statistics.median(steps),
            "tpot_p10_p90_ms": [1e3 * steps[len(steps) // 10], 1e3 * steps[(9 * len(steps)) // 10]],
        }
    return results


def child_measure(
    model: str, out: Path, batches: list[int], input_len: int, output_len: int, repeats: int, warmup_s: float
) -> None:
    """One model in this process, the whole GPU to itself."""
    run_batch = batch_runner(model, batches, input_len, output_len, gpu_share=0.9)
    warm_up(run_batch, batches, warmup_s)
    out.write_text(json.dumps(measure_batches(run_batch, batches, repeats)))


def child_measure_pair(
    folders: dict[str, str],
    out: Path,
    rounds: int,
    batches: list[int],
    input_len: int,
    output_len: int,
    repeats: int,
    warmup_s: float,
) -> None:
    """Both models in this process (two engines, each on a share of the GPU), taking turns round by round
    (original, fused, fused, original, ...): what varies between processes (clocks, placement) cannot fall
    on one model only. Writes ``{model: [per-round results]}``."""
    runners = {
        name: batch_runner(folder, batches, input_len, output_len, gpu_share=0.45) for name, folder in folders.items()
    }
    for run_batch in runners.values():
        warm_up(run_batch, batches, warmup_s)
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for round_index in range(rounds):
        order = ("original", "fused") if round_index % 2 == 0 else ("fused", "original")
        for name in order:
            runs[name].append(measure_batches(runners[name], batches, repeats))
    out.write_text(json.dumps(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="deepseek-v3")
    parser.add_argument("--preset", default="v3")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--quantization", default="none", help="none (bf16) or fp8-block (DeepSeek-V3's own format)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=3, help="processes per model, alternating (3+: the median drops one slow process)"
    )
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument(
        "--one-process", action="store_true", help="both models in one process, taking turns for --rounds rounds"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeprep-fused-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-pair", nargs=3, metavar=("ORIGINAL", "FUSED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    measure = (args.batches, args.input_len, args.output_len, args.repeats, args.warmup_s)
    if args.child:
        child_measure(args.child[0], Path(args.child[1]), *measure)
        return
    if args.child_pair:
        original, fused, out = args.child_pair
        child_measure_pair({"original": original, "fused": fused}, Path(out), args.rounds, *measure)
        return

    folders = weightless_folders(args.family, args.preset, args.layers, args.replicas, args.quantization, args.workdir)
    if args.one_process:
        runs = run_child(["--child-pair", str(folders["original"]), str(folders["fused"])], args, "pair")
    else:
        runs = {"original": [], "fused": []}
        for round_index in range(args.rounds):
            order = ("original", "fused") if round_index % 2 == 0 else ("fused", "original")
            for name in order:
                runs[name].append(run_child(["--child", str(folders[name])], args, f"{name}-{round_index}"))
    rows = [summarize(batch, runs) for batch in map(str, args.batches)]
    model = f"{args.family} {args.preset} {args.quantization} x{args.layers} layers"
    where = "both in one process" if args.one_process else "a process each"
    print(f"{model}, input {args.input_len}, output {args.output_len}, {args.rounds} rounds per model ({where})")
    print("batch  TPOT orig/fused ms  fused/orig  orig noise   TTFT orig/fused ms  fused/orig  orig noise")
    for r in rows:
        print(
            f"{r['batch']:5d}  {r['original_tpot_ms']:7.2f}/{r['fused_tpot_ms']:7.2f}  {r['tpot_ratio']:10.3f}  "
            f"{r['tpot_noise']:10.3f}   {r['original_ttft_ms']:8.2f}/{r['fused_ttft_ms']:8.2f}  "
            f"{r['ttft_ratio']:10.3f}  {r['ttft_noise']:10.3f}"
        )
    if args.out:
        summary = {"family": args.family, "preset": args.preset, "layers": args.layers, "replicas": args.replicas}
        summary |= {"quantization": args.quantization, "rounds": args.rounds, "one_process": args.one_process}
        summary["runs"] = runs
        args.out.write_text(json.dumps({**summary, "command": " ".join(sys.argv), "rows": rows}, indent=1))


def run_child(job: list[str], args: argparse.Namespace, name: str) -> Any:
    """Run this script's ``job`` (``--child MODEL`` or ``--child-pair ORIGINAL FUSED``) in a fresh process;
    returns the JSON it writes."""
    out, log = args.workdir / f"{name}.json", args.workdir / f"{name}.log"
    command = [sys.executable, __file__, *job, str(out), "--batches", *map(str, args.batches)]
    command += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--rounds", str(args.rounds)]
    command += ["--repeats", str(args.repeats), "--warmup-s", str(args.warmup_s)]
    with log.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{name} failed:\n{log.read_text()[-4000:]}")
    return json.loads(out.read_text())


def summarize(batch: str, runs: dict[str, list[dict]]) -> dict:
    """Per model the median over its rounds; the original's spread over its rounds is the noise floor."""
    row: dict = {"batch": int(batch)}
    for metric in ("tpot_ms", "ttft_ms"):
        for name, results in runs.items():
            row[f"{name}_{metric}"] = statistics.median(r[batch][metric] for r in results)
            row[f"{name}_{metric}_rounds"] = [r[batch][metric] for r in results]
        key = metric.removesuffix("_ms")
        row[f"{key}_ratio"] = row[f"fused_{metric}"] / row[f"original_{metric}"]
        originals = row[f"original_{metric}_rounds"]
        row[f"{key}_noise"] = max(originals) / min(originals) - 1
    return row


if __name__ == "__main__":
    main()
