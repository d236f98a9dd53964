"""Fused shared experts vs the original MoE block in vLLM: TTFT and TPOT at several batch sizes, one run.

    python benchmarks/fused_shared_speed.py --family deepseek-v3 --preset v3 --layers 3 --out results.json

On a GPU host with vLLM 0.26 or 0.34 (``VLLM_BUNDLE=.vllm-gpu`` or ``.vllm-gpu-034``, then
``source tests/gpu/use_bundle.sh``). Real expert dims at a few layers; the weights are vLLM's dummy (random) weights,
since a bf16 DeepSeek-V3 MoE layer alone is 22.5 GB: the original folder holds the config and tokenizer, the
fused folder the same plus moeprep's prepared config and manifest with the routing contract, exactly as
``moeprep convert --fuse-shared-experts`` writes them; every router gate is then redrawn from N(0,1) with its
correction bias zeroed, so a batch's tokens spread over the experts as a trained router's do
(``--dummy-routing`` keeps vLLM's dummy gates, with which every token picks nearly the same experts). Each model
is measured in a fresh process with CUDA graphs on, driving vLLM's engine step by step (tokens sampled at
temperature 1): TTFT = time from adding a batch of requests to the first step that returns tokens (median of
``--repeats``), TPOT = median interval between later token-returning steps (each a decode step of the whole
batch), after decoding for ``--warmup-s`` seconds (GPU clocks up) and one warm-up batch at each size. The models
alternate over ``--rounds`` (original, fused, fused, original, ...: a drift over the run or a slow first process
falls on both): each model's time is the median over its rounds, and the spread of the original's own rounds
(max/min - 1) is the noise floor printed beside the ratios to the original. ``--one-process`` starts all models
in one process instead (one engine each, on an equal share of 90% of the GPU's memory) and alternates them round
by round there, so what varies from process to process (clocks, memory placement) cannot fall on one model only.
``--serial-baseline`` adds a third model: the original with its shared expert run after the routed experts on
the main stream (``VLLM_DISABLE_SHARED_EXPERTS_STREAM=1``) instead of overlapped with them on vLLM's auxiliary
stream (its default up to 256 tokens), the baseline fused-shared-expert prototypes were compared against.
``--no-shared-bound`` adds the original without its shared expert (``n_shared_experts`` null, routing
unchanged): no way of computing the shared expert, fused or not, is faster than not computing it, so
1 - no-shared / original bounds what fusing can save.
``--graph-replays N`` also times the model's forward alone: after each batch size's runs, its decode step's full
CUDA graph is replayed N times back to back in the engine's worker (GPU time, free of the host's scheduling,
sampling and output handling that make up much of a few-layer model's TPOT), on fixed token sets shared by every
model. ``--kernel-profile`` also records, per batch size, the GPU kernels of that graph (torch's profiler over
``KERNEL_PROFILE_REPLAYS`` replays: launches and microseconds per forward, by kernel name) and prints where each
model's kernels differ from the original's.
``--slot-tokens SPEC`` adds the fused folder served with ``MOEPREP_SHARED_SLOT_TOKENS=SPEC`` ("fused-steps"):
the slots at those step sizes only, vLLM's dense shared expert on its auxiliary stream at the others.
"fused" serves the fused folder with every step on the slots (``MOEPREP_SHARED_SLOT_TOKENS=all``; unset, the
runtime picks a per-step setting, ``moeprep/runtime/slot_steps.py``); ``--without-fused`` leaves it out (e.g.
original and fused-steps only).
``--resume FILE`` completes a run cut short: FILE (an earlier ``--out`` of the same setup) keeps its rounds and
only the model-rounds it lacks are run, in the order the full run would have run them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import patch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def without_shared_experts(config: Any) -> Any:
    """vLLM ``hf_overrides``: a null shared-expert count, for which vLLM 0.26's DeepSeek-V3 and GLM-4-MoE build
    no shared-expert MLP (set past transformers' field check, which takes an int only)."""
    object.__setattr__(config, "n_shared_experts", None)
    return config


# Each model measured: (its folder under --workdir, environment for its engine, vLLM hf_overrides).
VARIANTS: dict[str, tuple[str, dict[str, str], Callable[[Any], Any] | None]] = {
    "original": ("original", {}, None),
    "fused": ("fused", {"MOEPREP_SHARED_SLOT_TOKENS": "all"}, None),  # every step on the slots
    "serial": ("original", {"VLLM_DISABLE_SHARED_EXPERTS_STREAM": "1"}, None),
    "no-shared": ("original", {}, without_shared_experts),
}


def weightless_folders(
    family_name: str, preset: str, layers: int, replicas: int, quantization: str, root: Path
) -> dict[str, Path]:
    """``original`` (config + tokenizer) and ``fused`` (prepared config + manifest) folders, no weights."""
    from moeprep.checkpoint.writer import write_json
    from moeprep.convert import _file_record, prepared_config
    from moeprep.families import get_family
    from moeprep.fixtures.build import fixture_config
    from moeprep.fixtures.tokenizer import write_word_tokenizer
    from moeprep.plan import backend_target
    from moeprep.schema.manifest import Manifest, Source, write_manifest
    from moeprep.schema.routing import routing_json
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
    contract = routing_contract(family, moe, config, replicas)
    fused = folders["fused"]
    write_json(fused / "config.json", prepared_config(config, target, contract))
    files = {p.name: _file_record(p) for p in sorted(fused.iterdir())}
    source = Source("local", f"synthetic {family_name} {preset} ({layers} layers)", None, {})
    manifest = Manifest(
        "bench", config["model_type"], config["architectures"], source, target, files, {}, routing_json(contract)
    )
    write_manifest(fused, manifest)
    return folders


RunBatch = Callable[[int], tuple[float, list[float]]]
ForwardTime = Callable[[int], dict]  # batch -> {"forward_ms": ...[, "kernels": ...]}


def spread_routing(worker: Any, seed: int) -> int:
    """Runs in vLLM's worker: redraw every router gate's weight from N(0, 1) and zero the score-correction
    biases; returns how many gates. With vLLM's dummy weights (uniform in +-1e-3) the static correction bias
    outweighs the tiny router logits, so every token picks nearly the same experts; a trained router spreads a
    batch's tokens over many experts, and how many the MoE kernel reads is what its decode time depends on."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    gates = 0
    for name, param in sorted(worker.model_runner.model.named_parameters()):
        if name.endswith(".mlp.gate.e_score_correction_bias"):
            param.data.zero_()
        elif name.endswith(".mlp.gate.weight"):
            param.data.copy_(torch.randn(param.shape, generator=generator))
            gates += 1
    return gates


GRAPH_TOKEN_SETS = 8  # token sets a decode graph is replayed on, the same for every model


def full_decode_graph(runner: Any, batch: int) -> tuple[Any, Any]:
    """The full CUDA graph of a ``batch``-request decode step in vLLM's model runner, and the input-id buffer it
    reads: model runner v2 (vLLM 0.34: ``cudagraph_manager.graphs`` by ``BatchExecutionDescriptor``) or the
    v1 runner (vLLM 0.26: the model's ``concrete_cudagraph_entries`` by ``BatchDescriptor``)."""
    manager = getattr(runner, "cudagraph_manager", None)
    if manager is not None and hasattr(manager, "graphs"):
        found = {
            desc: graph
            for desc, graph in manager.graphs.items()
            if desc.num_tokens == batch and desc.cg_mode.name == "FULL" and not desc.num_active_loras
        }
        decode = {desc: graph for desc, graph in found.items() if desc.uniform_token_count == 1}
        graphs, input_ids = list((decode or found).values()), runner.input_buffers.input_ids
    else:
        entries = getattr(runner.model, "concrete_cudagraph_entries", {})
        graphs = [e.cudagraph for d, e in entries.items() if d.num_tokens == batch and d.uniform and e.cudagraph]
        input_ids = runner.input_ids.gpu
    if len(graphs) != 1:
        raise RuntimeError(f"expected one full decode CUDA graph for batch {batch}, found {len(graphs)}")
    return graphs[0], input_ids


def replay_decode_graph(worker: Any, batch: int, replays: int) -> float:
    """Runs in vLLM's worker: milliseconds per replay of the full CUDA graph of a ``batch``-request decode step
    (the model's forward alone, queued back to back: GPU time, none of the host's scheduling or sampling). The
    replays are spread over ``GRAPH_TOKEN_SETS`` sets of ``batch`` distinct tokens, drawn from seeds every
    model shares, written into the graph's input ids: what the step reads (which experts its tokens pick)
    does not depend on the tokens the last step happened to decode."""
    import torch

    runner = worker.model_runner
    graph, input_ids = full_decode_graph(runner, batch)
    vocab = runner.model_config.get_vocab_size()
    token_sets = [
        torch.randperm(vocab - 8, generator=torch.Generator().manual_seed(1000 * batch + index))[:batch] + 8
        for index in range(GRAPH_TOKEN_SETS)
    ]
    elapsed_ms = 0.0
    for tokens in token_sets:
        input_ids[:batch].copy_(tokens)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            graph.replay()
        start.record()
        for _ in range(replays // GRAPH_TOKEN_SETS):
            graph.replay()
        end.record()
        end.synchronize()
        elapsed_ms += start.elapsed_time(end)
    return elapsed_ms / (GRAPH_TOKEN_SETS * (replays // GRAPH_TOKEN_SETS))


KERNEL_PROFILE_REPLAYS = 20


def decode_graph_kernels(worker: Any, batch: int) -> dict[str, list[float]]:
    """Runs in vLLM's worker: the GPU kernels of the ``batch``-request decode graph, by name: [launches, microseconds]
    per replay, over ``KERNEL_PROFILE_REPLAYS`` replays under torch's profiler (after ``replay_decode_graph``, on
    its last token set). Empty where the profiler records no GPU kernels (no CUPTI); the summary says so."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graph, _ = full_decode_graph(worker.model_runner, batch)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(KERNEL_PROFILE_REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in profiler.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        device_us = getattr(event, "self_device_time_total", None)
        device_us = event.self_cuda_time_total if device_us is None else device_us
        launches, total_us = kernels.get(event.key[:160], [0.0, 0.0])
        kernels[event.key[:160]] = [launches + event.count, total_us + device_us]
    return {name: [n / KERNEL_PROFILE_REPLAYS, us / KERNEL_PROFILE_REPLAYS] for name, (n, us) in kernels.items()}


def batch_runner(
    model: str,
    overrides: Callable[[Any], Any] | None,
    batches: list[int],
    input_len: int,
    output_len: int,
    gpu_share: float,
    replays: int,
    spread: bool,
    kernel_profile: bool,
) -> tuple[RunBatch, ForwardTime | None]:
    """Start vLLM on ``model`` (dummy weights, ``gpu_share`` of the GPU's memory, config changed by
    ``overrides``); returns ``run_batch(n)``:
    n requests at once, (time to the first step that returns tokens, the intervals between later such steps),
    and with ``replays`` ``forward(n)``: the decode step's CUDA graph timed in the worker (and with
    ``kernel_profile`` its kernels)."""
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
        hf_overrides=overrides,
    )
    if spread and not llm.collective_rpc(spread_routing, args=(0,))[0]:
        raise RuntimeError(f"no router gates (.mlp.gate.weight) found in {model}")
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    # Sampled: a decode step's tokens, and so the experts they pick, do not hinge on a dummy model's greedy choice.
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
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

    def forward(batch: int) -> dict:
        timed = {"forward_ms": llm.collective_rpc(replay_decode_graph, args=(batch, replays))[0]}
        if kernel_profile:
            timed["kernels"] = llm.collective_rpc(decode_graph_kernels, args=(batch,))[0]
        return timed

    return run_batch, forward if replays else None


def warm_up(run_batch: RunBatch, batches: list[int], seconds: float) -> None:
    """Decode at the largest batch for ``seconds`` (GPU clocks up), then once at each batch size."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_batch(max(batches))
    for batch in batches:
        run_batch(batch)


def measure_batches(
    run_batch: RunBatch, forward: ForwardTime | None, batches: list[int], repeats: int
) -> dict[str, dict]:
    """``{batch: {ttft_ms, tpot_ms, tpot_p10_p90_ms[, forward_ms[, kernels]]}}``, medians over ``repeats``
    batches of each size; the decode graph is replayed after them (its attention then reads the last step's
    context)."""
    results = {}
    for batch in batches:
        runs = [run_batch(batch) for _ in range(repeats)]
        steps = sorted(step for _, intervals in runs for step in intervals)
        results[str(batch)] = {
            "ttft_ms": 1e3 * statistics.median(first for first, _ in runs),
            "tpot_ms": 1e3 * statistics.median(steps),
            "tpot_p10_p90_ms": [1e3 * steps[len(steps) // 10], 1e3 * steps[(9 * len(steps)) // 10]],
        }
        if forward is not None:
            results[str(batch)] |= forward(batch)
    return results


def turn_order(names: list[str], round_index: int) -> list[str]:
    """The models' order in a round: as given, then reversed, ... (a drift over the run falls on all)."""
    return names if round_index % 2 == 0 else names[::-1]


def child_measure(
    workdir: Path,
    names: list[str],
    out: Path,
    rounds: int,
    batches: list[int],
    input_len: int,
    output_len: int,
    repeats: int,
    warmup_s: float,
    replays: int,
    spread: bool,
    kernel_profile: bool,
) -> None:
    """The ``names`` models (``VARIANTS``) in this process, an engine each on an equal share of the GPU, taking
    turns for ``rounds`` rounds (in the given order, then reversed, ...). Writes ``{name: [per-round results]}``."""
    # The router reset and the graph timer are functions sent to the engine's worker, which vLLM pickles only so.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    runners = {}
    engine = (batches, input_len, output_len, 0.9 / len(names), replays, spread, kernel_profile)
    for name in names:
        folder, env, overrides = VARIANTS[name]
        with patch.dict(os.environ, env):  # read by the engine process this starts
            runners[name] = batch_runner(str(workdir / folder), overrides, *engine)
    for run_batch, _ in runners.values():
        warm_up(run_batch, batches, warmup_s)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in turn_order(names, round_index):
            runs[name].append(measure_batches(*runners[name], batches, repeats))
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
        "--one-process", action="store_true", help="all models in one process, taking turns for --rounds rounds"
    )
    parser.add_argument(
        "--serial-baseline", action="store_true", help="also the original with its shared expert on the main stream"
    )
    parser.add_argument(
        "--no-shared-bound",
        action="store_true",
        help="also the original without shared experts: the floor for any way of computing them",
    )
    parser.add_argument(
        "--graph-replays",
        type=int,
        default=0,
        help="also time each decode step's full CUDA graph over this many replays (GPU time of the forward alone)",
    )
    parser.add_argument(
        "--kernel-profile",
        action="store_true",
        help="with --graph-replays: also record each decode graph's GPU kernels (launches and time per forward)",
    )
    parser.add_argument(
        "--dummy-routing", action="store_true", help="keep vLLM's dummy router gates (tokens crowd onto few experts)"
    )
    parser.add_argument(
        "--slot-tokens", default=None, help="also the fused folder with MOEPREP_SHARED_SLOT_TOKENS set to this"
    )
    parser.add_argument(
        "--without-fused",
        action="store_true",
        help="leave out the fused folder at its default setting (with --slot-tokens: original and fused-steps only)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moeprep-fused-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="an earlier --out of the same setup: keep its rounds and run only the model-rounds it lacks",
    )
    parser.add_argument("--child", nargs="+", metavar=("OUT", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slot_tokens:
        from moeprep.runtime.slot_steps import SLOT_TOKENS_ENV, SlotSteps

        try:
            SlotSteps.parse(args.slot_tokens)  # a bad setting stops here, not in an engine
        except ValueError as error:
            parser.error(str(error))
        VARIANTS["fused-steps"] = ("fused", {SLOT_TOKENS_ENV: args.slot_tokens}, None)
    if 0 < args.graph_replays < GRAPH_TOKEN_SETS:
        parser.error(f"--graph-replays: at least {GRAPH_TOKEN_SETS} (one per token set)")
    if args.kernel_profile and not args.graph_replays:
        parser.error("--kernel-profile profiles the decode graphs --graph-replays times: add --graph-replays N")
    if args.child:
        out, *names = args.child
        measure = (args.batches, args.input_len, args.output_len, args.repeats, args.warmup_s, args.graph_replays)
        measure += (not args.dummy_routing, args.kernel_profile)
        child_measure(args.workdir, names, Path(out), args.rounds, *measure)
        return

    folders = weightless_folders(args.family, args.preset, args.layers, args.replicas, args.quantization, args.workdir)
    if args.no_shared_bound and "n_shared_experts" not in json.loads((folders["original"] / "config.json").read_text()):
        parser.error(f"--no-shared-bound: {args.family} does not count its shared experts (n_shared_experts)")
    if args.without_fused and not (args.slot_tokens or args.serial_baseline or args.no_shared_bound):
        parser.error("--without-fused needs another model: add --slot-tokens, --serial-baseline or --no-shared-bound")
    names = ["original"] + ([] if args.without_fused else ["fused"]) + (["serial"] if args.serial_baseline else [])
    names += ["no-shared"] if args.no_shared_bound else []
    names += ["fused-steps"] if args.slot_tokens else []
    if args.one_process:
        runs = run_child(names, args.rounds, args, "all")
    else:
        runs = resumed_runs(args, names) if args.resume else {name: [] for name in names}
        for round_index in range(args.rounds):
            for name in turn_order(names, round_index):
                if len(runs[name]) <= round_index:  # not done by the run resumed
                    runs[name] += run_child([name], 1, args, f"{name}-{round_index}")[name]
                    write_results(args, runs)  # every process done so far survives a run cut short
    print_rows(args, write_results(args, runs), runs)
    if args.kernel_profile:
        print_kernel_differences(runs, args.batches)


def resumed_runs(args: argparse.Namespace, names: list[str]) -> dict[str, list[dict]]:
    """The per-model rounds of the ``--resume`` file, after checking it measured the same setup."""
    earlier = json.loads(args.resume.read_text())
    setup = {"family": args.family, "preset": args.preset, "layers": args.layers, "quantization": args.quantization}
    differs = {key: earlier.get(key) for key, value in setup.items() if earlier.get(key) != value}
    if differs or sorted(earlier["runs"]) != sorted(names) or [r["batch"] for r in earlier["rows"]] != args.batches:
        sys.exit(f"--resume {args.resume}: another setup ({differs or 'models or batches differ'})")
    return {name: earlier["runs"][name] for name in names}


def write_results(args: argparse.Namespace, runs: dict[str, list[dict]]) -> list[dict]:
    """Summarize ``runs`` per batch size (rows) and, with ``--out``, write them with every round's results."""
    rows = [summarize(batch, runs) for batch in map(str, args.batches)]
    if args.out:
        summary = {"family": args.family, "preset": args.preset, "layers": args.layers, "replicas": args.replicas}
        summary |= {"quantization": args.quantization, "rounds": args.rounds, "one_process": args.one_process}
        summary |= {"rounds_done": {name: len(results) for name, results in runs.items()}}
        summary["dummy_routing"] = args.dummy_routing
        summary["runs"] = runs
        args.out.write_text(json.dumps({**summary, "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return rows


def print_rows(args: argparse.Namespace, rows: list[dict], runs: dict[str, list[dict]]) -> None:
    """Per batch: each model's TPOT, TTFT (and decode-graph time), their ratios to the original's, the
    original's noise floor."""
    names = list(runs)
    model = f"{args.family} {args.preset} {args.quantization} x{args.layers} layers"
    where = "all in one process" if args.one_process else "a process each"
    print(f"{model}, input {args.input_len}, output {args.output_len}, {args.rounds} rounds per model ({where})")
    ratios = [(name, "original") for name in names[1:]]
    ratios += [("fused", "serial")] if {"fused", "serial"} <= set(names) else []
    for metric in (metric.removesuffix("_ms") for metric in measured_metrics(runs)):
        heads = "".join(f"{f'{a}/{b}':>20}" for a, b in ratios)
        print(f"batch  {metric.upper() + ' ' + '/'.join(names) + ' ms':>40}{heads}  original's noise")
        for r in rows:
            times = "/".join(f"{r[f'{name}_{metric}_ms']:.2f}" for name in names)
            cells = "".join(f"{r[f'{a}_{metric}_ms'] / r[f'{b}_{metric}_ms']:20.3f}" for a, b in ratios)
            print(f"{r['batch']:5d}  {times:>40}{cells}  {r[f'{metric}_noise']:16.3f}")


def print_kernel_differences(runs: dict[str, list[dict]], batches: list[int], shown: int = 6) -> None:
    """Per batch and model, from the first round's profile: GPU kernel launches and time per forward against the
    original's, and the kernels whose time per forward differs most."""
    for batch in map(str, batches):
        profiles = {name: results[0][batch].get("kernels", {}) for name, results in runs.items() if results}
        original = profiles.get("original", {})
        for name, kernels in profiles.items():
            if not kernels:
                print(f"batch {batch} {name}: the profiler recorded no GPU kernels")
                continue
            launches, total_us = (sum(k[i] for k in kernels.values()) for i in (0, 1))
            print(f"batch {batch} {name}: {launches:.0f} kernel launches, {total_us:.1f} us per forward")
            if name == "original" or not original:
                continue
            names = set(kernels) | set(original)
            change = {k: kernels.get(k, [0, 0])[1] - original.get(k, [0, 0])[1] for k in names}
            for kernel in sorted(names, key=lambda k: -abs(change[k]))[:shown]:
                counts = f"{original.get(kernel, [0, 0])[0]:.0f} -> {kernels.get(kernel, [0, 0])[0]:.0f}"
                print(f"    {change[kernel]:+8.1f} us  launches {counts:>9}  {kernel[:90]}")


def run_child(names: list[str], rounds: int, args: argparse.Namespace, name: str) -> Any:
    """Measure the ``names`` models for ``rounds`` rounds in a fresh process running this script; returns the
    JSON it writes (``{name: [per-round results]}``)."""
    out, log = args.workdir / f"{name}.json", args.workdir / f"{name}.log"
    command = [sys.executable, __file__, "--child", str(out), *names, "--workdir", str(args.workdir)]
    command += ["--batches", *map(str, args.batches), "--rounds", str(rounds)]
    command += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    command += ["--repeats", str(args.repeats), "--warmup-s", str(args.warmup_s)]
    command += ["--graph-replays", str(args.graph_replays)] + (["--dummy-routing"] if args.dummy_routing else [])
    command += ["--kernel-profile"] if args.kernel_profile else []
    command += ["--slot-tokens", args.slot_tokens] if args.slot_tokens else []
    with log.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{name} failed:\n{log.read_text()[-4000:]}")
    return json.loads(out.read_text())


def measured_metrics(runs: dict[str, list[dict]]) -> list[str]:
    """``tpot_ms``, ``ttft_ms`` and, when the decode graphs were timed, ``forward_ms``."""
    first = next(iter(next(iter(runs.values()))[0].values()))
    return [metric for metric in ("tpot_ms", "ttft_ms", "forward_ms") if metric in first]


def summarize(batch: str, runs: dict[str, list[dict]]) -> dict:
    """Per model the median over its rounds; the original's spread over its rounds is the noise floor. Models
    with no round yet (a run in progress) are left out, and so are the ratios that need them."""
    row: dict = {"batch": int(batch)}
    measured = {name: results for name, results in runs.items() if results}
    for metric in measured_metrics(measured):
        for name, results in measured.items():
            row[f"{name}_{metric}"] = statistics.median(r[batch][metric] for r in results)
            row[f"{name}_{metric}_rounds"] = [r[batch][metric] for r in results]
        if "original" not in measured:
            continue
        key = metric.removesuffix("_ms")
        if "fused" in measured:
            row[f"{key}_ratio"] = row[f"fused_{metric}"] / row[f"original_{metric}"]
        if "fused-steps" in measured:
            row[f"{key}_steps_ratio"] = row[f"fused-steps_{metric}"] / row[f"original_{metric}"]
        if "serial" in measured and "fused" in measured:
            row[f"{key}_ratio_to_serial"] = row[f"fused_{metric}"] / row[f"serial_{metric}"]
        originals = row[f"original_{metric}_rounds"]
        row[f"{key}_noise"] = max(originals) / min(originals) - 1
    return row


if __name__ == "__main__":
    main()
