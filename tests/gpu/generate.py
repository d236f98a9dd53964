"""Greedy generation with vLLM's ``LLM`` on one checkpoint; writes token ids and load facts as JSON.

Usage: python tests/gpu/generate.py MODEL OUT.json [--max-tokens N] [--moe-backend B]
Run one checkpoint per process so each engine starts on a clean GPU.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    kwargs = {"moe_backend": args.moe_backend} if args.moe_backend else {}
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(
        args.model, max_model_len=args.max_model_len, gpu_memory_utilization=0.5, enforce_eager=True, seed=0, **kwargs
    )
    ready = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    tokens = [list(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in PROMPTS]
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "tokens": tokens, "engine_ready_s": ready}, f)


if __name__ == "__main__":
    main()
