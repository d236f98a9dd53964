"""On an sm90 GPU with vLLM 0.34+: prepared Triton and Marlin folders are served from vLLM's weight cache
(``vllm preload`` holds the post-processed weights, the engine maps them with ``--load-format ipc_cache``) and
generate the original's greedy tokens; the engine must map the daemon's tensors, not fall back to disk."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.gpu.test_mxfp4_gpu import OUT, VLLM_MOE_BACKEND, generate, tiny_gpt_oss  # noqa: F401 (fixture)

HAS_WEIGHT_CACHE = importlib.util.find_spec("vllm.model_executor.model_loader.weight_cache") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, daemon: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the weight cache daemon was not ready in {timeout} s: {log.read_text()[-4000:]}")


@pytest.mark.skipif(not HAS_WEIGHT_CACHE, reason="this vLLM has no weight cache (vLLM 0.30+)")
@pytest.mark.parametrize("backend", ["triton", "marlin"])
def test_prepared_folder_served_from_the_weight_cache(tiny_gpt_oss: dict[str, Path], backend: str) -> None:  # noqa: F811
    folder, moe_backend = tiny_gpt_oss[backend], VLLM_MOE_BACKEND[backend]
    sockets = tempfile.mkdtemp(prefix="wc", dir="/tmp")  # AF_UNIX paths must stay short
    port = free_port()
    log = OUT / f"gpt-oss-{backend}-preload.log"
    memory = os.environ.get("MOEPREP_GPU_MEMORY_UTILIZATION", "0.5")
    preload = [sys.executable, "-m", "vllm.entrypoints.cli.main", "preload", "--model", str(folder)]
    preload += ["--max-model-len", "512", "--gpu-memory-utilization", memory, "--enforce-eager", *moe_backend]
    preload += ["--weight-cache-socket-dir", sockets, "--weight-cache-health-port", str(port)]
    preload += ["--weight-cache-health-host", "127.0.0.1"]
    with log.open("w") as f:
        daemon = subprocess.Popen(preload, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(port, daemon, log)
        loader = json.dumps({"socket_dir": sockets, "fallback": False})
        name = f"gpt-oss-{backend}-weight-cache"
        cached = generate(folder, name, *moe_backend, "--load-format", "ipc_cache", "--loader-config", loader)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(60)
    assert "Mapped" in (OUT / f"{name}.log").read_text()  # "Mapped N tensors from the weight cache daemon"
    original = generate(tiny_gpt_oss["original"], f"gpt-oss-original-{backend}-weight-cache", *moe_backend)
    assert cached == original
