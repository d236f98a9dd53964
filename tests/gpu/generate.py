"""Greedy generation with vLLM's ``LLM`` on one checkpoint; writes token ids and load facts as JSON.

Usage: python tests/gpu/generate.py MODEL OUT.json [--max-tokens N] [--moe-backend B]
           [--lora ADAPTER [--mixed-moe-lora-format]] [--score SEQUENCES.json]
           [--load-format F [--loader-config JSON]]
Writes the greedy tokens of the sample prompts and the log-probability of every token after the first
of each sequence (teacher forcing, through prompt_logprobs): the given sequences, or by default each
prompt followed by its greedy tokens. Run one checkpoint per process so each engine starts on a clean GPU;
MOEPREP_GPU_MEMORY_UTILIZATION (default 0.5) lets several such processes share one GPU, and
MOEPREP_KV_CACHE_BYTES fixes the KV cache size, so that engines starting side by side (``run_all.sh -n N``) do
not read each other's allocations as their own in vLLM's memory profile.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moeprep.fixtures.tokenizer import SAMPLE_PROMPTS as PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--moe-backend", default=None)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--lora", default=None)
    parser.add_argument("--mixed-moe-lora-format", action="store_true")
    parser.add_argument("--lora-target-modules", nargs="+", default=None)
    parser.add_argument("--score", default=None)
    parser.add_argument("--load-format", default=None)
    parser.add_argument("--loader-config", default=None, help="vLLM's model_loader_extra_config, as JSON")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs: dict = {"moe_backend": args.moe_backend} if args.moe_backend else {}
    kwargs |= {"load_format": args.load_format} if args.load_format else {}
    kwargs |= {"model_loader_extra_config": json.loads(args.loader_config)} if args.loader_config else {}
    if kv_cache_bytes := os.environ.get("MOEPREP_KV_CACHE_BYTES"):
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    lora = None
    if args.lora:
        rank = json.load(open(f"{args.lora}/adapter_config.json"))["r"]
        kwargs |= {"enable_lora": True, "max_lora_rank": max(8, rank), "max_loras": 1}
        kwargs |= {"enable_mixed_moe_lora_format": True} if args.mixed_moe_lora_format else {}
        kwargs |= {"lora_target_modules": args.lora_target_modules} if args.lora_target_modules else {}
        lora = LoRARequest("adapter", 1, args.lora)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(
        args.model,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=float(os.environ.get("MOEPREP_GPU_MEMORY_UTILIZATION", "0.5")),
        enforce_eager=True,
        seed=0,
        **kwargs,
    )
    ready = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = [llm.generate([p], params, use_tqdm=False, lora_request=lora)[0] for p in PROMPTS]
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    prompts = [list(o.prompt_token_ids) for o in outputs]
    sequences = json.load(open(args.score)) if args.score else [p + t for p, t in zip(prompts, tokens, strict=True)]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    scores = []
    for ids in sequences:
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False, lora_request=lora)[0]
        scores.append([entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True)])
    with open(args.out, "w") as f:
        result = {"model": args.model, "tokens": tokens, "prompt_ids": prompts, "sequences": sequences}
        json.dump({**result, "scores": scores, "engine_ready_s": ready}, f)


if __name__ == "__main__":
    main()
