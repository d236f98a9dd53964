"""The fused layer's Triton MoE kernel with its own tiles vs with the tiles vLLM tuned for the original layer.

    python benchmarks/moe_tuned_configs.py --out results.json        # DeepSeek-V3 block fp8, one TP-8 rank's slice

On a GPU host with vLLM 0.26. vLLM picks the fused MoE kernel's tiles from a file tuned per expert count
(``E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json`` for DeepSeek-V3 at TP 8);
a fused layer has ``E + 1`` experts, for which no file exists, so it runs vLLM's default tiles. Would it gain
from the original count's tuned ones? Three kernels, each vLLM's ``fused_experts`` on the same random weights
and per-token random routing (distinct experts), timed as CUDA graphs of ``--calls`` back-to-back calls (GPU
time), rounds interleaved, the median over ``--rounds``:

- original: ``E`` experts, top-k, vLLM's lookup (the tuned file, where the device has one);
- fused: ``E + 1`` experts, top-k + 1 (the slot), vLLM's lookup (its default tiles): the layer as served;
- fused-original-tiles: the same layer run with the original's tiles at each batch size.

The original runs one expert fewer per token (its shared expert is a separate GEMM, not timed here): the
question is fused-original-tiles against fused; the original's row is for scale. The noise is the spread of
fused's rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

BLOCK = [128, 128]


def random_fp8(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)


def block_scales(experts: int, rows: int, cols: int) -> torch.Tensor:
    blocks = (experts, -(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    return torch.rand(blocks, device="cuda", dtype=torch.float32) * 1e-2 + 1e-3


def routing(tokens: int, experts: int, top_k: int, slot: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``top_k`` distinct random experts (plus the slot, where one is given) and random weights."""
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    if slot is not None:
        ids = torch.cat([ids, torch.full((tokens, 1), slot)], dim=1)
    weights = torch.rand(ids.shape, dtype=torch.float32)
    return weights.cuda(), ids.to(device="cuda", dtype=torch.int32)


class Kernel:
    """One variant at one batch size: a CUDA graph of ``calls`` fused_experts calls."""

    def __init__(
        self, weights: dict[str, torch.Tensor], routed: int, experts: int, top_k: int, tokens: int, calls: int
    ) -> None:
        """The first ``experts`` of ``weights``; a layer of ``routed + 1`` also routes every token to the last."""
        from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

        w1, w2 = weights["w1"][:experts], weights["w2"][:experts]
        quant = fp8_w8a8_moe_quant_config(
            w1_scale=weights["w1_scale"][:experts], w2_scale=weights["w2_scale"][:experts], block_shape=BLOCK
        )
        topk_weights, topk_ids = routing(tokens, routed, top_k, None if experts == routed else routed)
        hidden = torch.randn(tokens, w1.shape[2], device="cuda", dtype=torch.bfloat16)

        def call() -> torch.Tensor:
            return fused_experts(hidden, w1, w2, topk_weights, topk_ids, global_num_experts=experts, quant_config=quant)

        self.inputs = (hidden, w1, w2, topk_weights, topk_ids, quant)  # the graph reads them: keep them alive
        call()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(calls):
                call()
        self.calls = calls

    def time_us(self, replays: int) -> float:
        self.graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            self.graph.replay()
        end.record()
        end.synchronize()
        return 1e3 * start.elapsed_time(end) / (replays * self.calls)


def build(args: argparse.Namespace) -> dict[str, dict[int, Kernel]]:
    """The three variants' graphs at every batch size."""
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    e, n, k = args.experts, args.intermediate, args.hidden
    weights = {
        "w1": random_fp8((e + 1, 2 * n, k)),
        "w2": random_fp8((e + 1, k, n)),
        "w1_scale": block_scales(e + 1, 2 * n, k),
        "w2_scale": block_scales(e + 1, k, n),
    }

    def tiles(experts: int, top_k: int, tokens: int) -> dict[str, int]:
        return try_get_optimal_moe_config((experts, 2 * n, k), (experts, k, n), top_k, "fp8_w8a8", tokens, BLOCK)

    variants: dict[str, dict[int, Kernel]] = {"original": {}, "fused": {}, "fused-original-tiles": {}}
    for m in args.batches:
        variants["original"][m] = Kernel(weights, e, e, args.top_k, m, args.calls)
        variants["fused"][m] = Kernel(weights, e, e + 1, args.top_k + 1, m, args.calls)
        original_tiles = tiles(e, args.top_k, m)
        with override_config(original_tiles):
            variants["fused-original-tiles"][m] = Kernel(weights, e, e + 1, args.top_k + 1, m, args.calls)
        print(f"batch {m}: original's tiles {original_tiles}, fused's {tiles(e + 1, args.top_k + 1, m)}")
    return variants


def measure(variants: dict[str, dict[int, Kernel]], args: argparse.Namespace) -> dict[str, Any]:
    times: dict[str, dict[int, list[float]]] = {name: {m: [] for m in args.batches} for name in variants}
    names = list(variants)
    for round_index in range(args.rounds):
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            for m, kernel in variants[name].items():
                times[name][m].append(kernel.time_us(args.replays))
    summary: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "batches": {}}
    print(
        f"{'batch':>5} " + " ".join(f"{n + ' us':>17}" for n in names) + "  original tiles/fused  fused/original  noise"
    )
    for m in args.batches:
        median = {name: statistics.median(times[name][m]) for name in names}
        fused = times["fused"][m]
        row = {
            "us": median,
            "rounds_us": {name: times[name][m] for name in names},
            "original_tiles_over_fused": median["fused-original-tiles"] / median["fused"],
            "fused_over_original": median["fused"] / median["original"],
            "noise": max(fused) / min(fused) - 1,
        }
        summary["batches"][m] = row
        cells = " ".join(f"{median[n]:17.1f}" for n in names)
        ratios = f"{row['original_tiles_over_fused']:20.3f}  {row['fused_over_original']:14.3f}"
        print(f"{m:>5} {cells}  {ratios}  {row['noise']:.3f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=256, help="routed experts (DeepSeek-V3: 256)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--intermediate", type=int, default=256, help="expert intermediate size per rank (TP 8)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--calls", type=int, default=20, help="kernel calls per CUDA graph")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    summary = measure(build(args), args)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
