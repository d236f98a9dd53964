"""On an sm90 GPU with vLLM 0.34+: prepared Triton and Marlin folders are served from vLLM's weight cache
(``vllm preload`` holds the post-processed weights, the engine maps them with ``--load-format ipc_cache``) and
generate the original's greedy tokens; the engine must map the daemon's tensors, not fall back to disk.

vLLM 0.34 itself cannot run gpt-oss from its weight cache yet: the engine builds the model on the meta device and
swaps the daemon's tensors into the modules' parameters, but FlashAttention keeps the attention-sink tensor it
was constructed with (``FlashAttentionImpl.sinks``), still on the meta device, so the first forward fails in
``_vllm_fa3_C::fwd`` (seen on the H200). The original gpt-oss cannot use the weight cache at all (vLLM's
``GptOssMxfp4MoEMethod`` does not declare ``supports_pre_processed_weights``). The test requires moeprep's part,
the mapping and the MoE kernel rebuild, and reports that vLLM failure as an expected failure; once vLLM keeps
the sinks, it requires the original's tokens."""

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

from tests.gpu.test_mxfp4_gpu import HERE, OUT, VLLM_MOE_BACKEND, generate, tiny_gpt_oss  # noqa: F401 (fixture)

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
    name = f"gpt-oss-{backend}-weight-cache"
    loader = json.dumps({"socket_dir": sockets, "fallback": False})
    command = [sys.executable, str(HERE / "generate.py"), str(folder), str(OUT / f"{name}.json"), *moe_backend]
    try:
        wait_healthy(port, daemon, log)
        with (OUT / f"{name}.log").open("w") as f:
            command += ["--load-format", "ipc_cache", "--loader-config", loader]
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(60)
    engine_log = (OUT / f"{name}.log").read_text()
    assert "tensors from the weight cache daemon" in engine_log, engine_log[-4000:]  # "Mapped N tensors ..."
    assert "PreparedCheckpointMismatch" not in engine_log  # the prepared methods rebuilt their kernels
    if code != 0 and "_vllm_fa3_C::fwd: attempted to run this operator with Meta tensors" in engine_log:
        pytest.xfail("vLLM 0.34's weight cache leaves gpt-oss's attention sinks on the meta device")
    assert code == 0, engine_log[-4000:]
    cached = json.loads((OUT / f"{name}.json").read_text())["tokens"]
    original = generate(tiny_gpt_oss["original"], f"gpt-oss-original-{backend}-weight-cache", *moe_backend)
    assert cached == original
