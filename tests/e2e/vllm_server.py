"""Start ``vllm serve`` on loopback for a test and query it over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from moeprep.fixtures.tokenizer import SAMPLE_PROMPTS as PROMPTS

VLLM = str(Path(sys.executable).parent / "vllm")
SERVE_ARGS = ("--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(plugins: bool, tp: int = 1) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    if not plugins:
        env["VLLM_PLUGINS"] = "no-plugins-at-all"
    env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in server_cores(tp))
    return env


def server_cores(tp: int) -> list[int]:
    """One core per rank. Under pytest-xdist each worker's single-rank servers take a core of their own, so two
    workers serve side by side; vLLM CPU would otherwise bind every server's threads to all cores."""
    cores = os.cpu_count() or 1
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    first = worker if tp == 1 else 0
    return [(first + rank) % cores for rank in range(tp)]


def serve_command(model: Path, port: int, dtype: str = "bfloat16", tp: int = 1, extra: Sequence[str] = ()) -> list[str]:
    command = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, *SERVE_ARGS]
    command += extra
    config = model / "config.json"
    if config.is_file() and "kv_lora_rank" in json.loads(config.read_text()):  # MLA attention (DeepSeek-V3, Kimi-K2)
        # vLLM CPU picks its AMX MLA backend on CPUs with AMX, which has no float32 path; the reference backend
        # serves every dtype on every CPU, so the comparisons run the same attention on any machine
        command += ["--attention-backend", "CPU_MLA"]
    if tp > 1:  # the CPU memory check counts all ranks' reservations against one node
        command += ["--tensor-parallel-size", str(tp), "--gpu-memory-utilization", "0.2"]
    return command


@contextmanager
def vllm_server(
    model: Path,
    log: Path,
    plugins: bool = True,
    timeout: float = 300,
    dtype: str = "bfloat16",
    tp: int = 1,
    extra: Sequence[str] = (),
) -> Iterator[str]:
    """Serve ``model`` (``extra``: more ``vllm serve`` flags); yields the base URL once /health answers. Fails
    with the log tail if vLLM exits."""
    port = free_port()
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            serve_command(model, port, dtype, tp, extra),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=serve_env(plugins, tp),
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not ready after {timeout}s:\n{log_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_until_exit(
    model: Path, log: Path, plugins: bool = True, timeout: float = 240, tp: int = 1, extra: Sequence[str] = ()
) -> tuple[int, str]:
    """Start ``vllm serve`` expecting it to refuse the model; returns (exit code, output)."""
    proc = subprocess.Popen(
        serve_command(model, free_port(), tp=tp, extra=extra),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=serve_env(plugins, tp),
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout)
    finally:
        stop(proc)
    return code, log.read_text()


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def complete(url: str, model: Path, prompt: str | list[int], max_tokens: int, **extra: object) -> dict:
    """One greedy ``/v1/completions`` choice (``prompt``: text or token ids)."""
    body = {
        "model": str(model),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.load(r)["choices"][0]


def greedy_token_ids(url: str, model: Path, prompt: str, max_tokens: int = 32) -> list[int]:
    """Greedy completion of ``prompt``: exactly ``max_tokens`` generated token ids."""
    choice = complete(url, model, prompt, max_tokens)
    assert len(choice["token_ids"]) == max_tokens
    return choice["token_ids"]


def sequence_logprobs(url: str, model: Path, token_ids: list[int]) -> list[float]:
    """The model's log-probability of each token of ``token_ids`` after the first (teacher forcing)."""
    choice = complete(url, model, token_ids, 1, prompt_logprobs=0)
    scores = choice["prompt_logprobs"][1:]
    return [entry[str(token)]["logprob"] for entry, token in zip(scores, token_ids[1:], strict=True)]


def serve_and_generate(
    model: Path, log: Path, max_tokens: int = 32, dtype: str = "bfloat16", tp: int = 1, extra: Sequence[str] = ()
) -> list[list[int]]:
    """One server for ``model``; the prompts are sent one at a time so batching cannot change numerics."""
    with vllm_server(model, log, dtype=dtype, tp=tp, extra=extra) as url:
        return [greedy_token_ids(url, model, p, max_tokens) for p in PROMPTS]
