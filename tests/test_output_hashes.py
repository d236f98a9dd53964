"""Every backend and feature writes the same bytes as when ``tests/golden/output_hashes.json`` was recorded: the
guard that keeps a refactoring from changing a prepared folder. The fixtures are seeded (``build_fixture``), so a
digest changes only when moeprep's output does; after a deliberate format change, re-record with
``MOEPREP_RECORD_OUTPUT_HASHES=1 pytest tests/test_output_hashes.py`` and say why in the commit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeprep.convert import convert, load_plan
from moeprep.fixtures import build_fixture
from moeprep.plan import PlanOptions

GOLDEN = Path(__file__).parent / "golden" / "output_hashes.json"
RECORD = os.environ.get("MOEPREP_RECORD_OUTPUT_HASHES") == "1"
VLLM = "0.34.0"  # the layouts' target unless a case names one, fixed so that the installed vLLM does not matter
ROOT = Path("/tmp/moeprep-output-hashes")
SHARD = 400_000  # several shards per folder

# id: (family, quantization, backend, PlanOptions fields, with a LoRA adapter)
CASES: dict[str, tuple[str, str, str, dict, bool]] = {
    "gpt-oss-none": ("gpt-oss", "none", "none", {}, False),
    "gpt-oss-triton-sm90": ("gpt-oss", "none", "triton", {"arch": "sm90"}, False),
    "gpt-oss-triton-sm100": ("gpt-oss", "none", "triton", {"arch": "sm100"}, False),
    "gpt-oss-marlin": ("gpt-oss", "none", "marlin", {}, False),
    "gpt-oss-flashinfer-trtllm": (
        "gpt-oss",
        "none",
        "flashinfer-trtllm",
        {"arch": "sm100", "vllm_version": "0.26.0"},
        False,
    ),
    "gpt-oss-dequant": ("gpt-oss", "none", "dequant", {"vllm_version": "0.32.0"}, False),
    "gpt-oss-cpu": ("gpt-oss", "none", "cpu", {"vllm_version": "0.32.0"}, False),
    "gpt-oss-triton-tp2": ("gpt-oss", "none", "triton", {"arch": "sm90", "tp_size": 2}, False),
    "gpt-oss-marlin-ep2": ("gpt-oss", "none", "marlin", {"ep_size": 2}, False),
    "deepseek-v3-none": ("deepseek-v3", "none", "none", {}, False),
    "deepseek-v3-fused": ("deepseek-v3", "none", "none", {"fuse_shared_replicas": 1}, False),
    "deepseek-v3-fused-2": ("deepseek-v3", "none", "none", {"fuse_shared_replicas": 2}, False),
    "deepseek-v3-fp8-fused": ("deepseek-v3", "fp8-block", "none", {"fuse_shared_replicas": 1}, False),
    "deepseek-v3-fp8-ep2": ("deepseek-v3", "fp8-block", "none", {"ep_size": 2}, False),
    "deepseek-v3-ep2": ("deepseek-v3", "none", "none", {"ep_size": 2}, False),
    "glm4-moe-fused": ("glm4-moe", "none", "none", {"fuse_shared_replicas": 1}, False),
    "glm4-moe-lora": ("glm4-moe", "none", "none", {}, True),
    "llama4-fused": ("llama4", "none", "none", {"fuse_shared_replicas": 1}, False),
    "qwen2-moe-fused": ("qwen2-moe", "none", "none", {"fuse_shared_replicas": 1}, False),
    "qwen3-moe-none": ("qwen3-moe", "none", "none", {}, False),
    "qwen3-moe-tp2": ("qwen3-moe", "none", "none", {"tp_size": 2}, False),
    "mixtral-none": ("mixtral", "none", "none", {}, False),
}


def folder_digest(folder: Path) -> str:
    """sha256 over every file's path and bytes, in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def glm4_adapter(base: Path, folder: Path) -> Path:
    """A seeded PEFT adapter on the first two MoE layers' fused gate_up and down experts modules."""
    config = json.loads((base / "config.json").read_text())
    h, i, experts = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]
    first, rank = config["first_k_dense_replace"], 2
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for layer in (first, first + 1):
        for e in range(experts):
            for name, (rows, cols) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
                module = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{name}"
                tensors[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator).bfloat16()
                tensors[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator).bfloat16()
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": ["down_proj", "gate_up_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


@pytest.fixture(scope="module")
def recorded() -> dict[str, str]:
    hashes = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    yield hashes
    if RECORD:
        GOLDEN.write_text(json.dumps(dict(sorted(hashes.items())), indent=1) + "\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_folder_bytes_are_unchanged(recorded: dict[str, str], case: str) -> None:
    family, quantization, backend, options, with_lora = CASES[case]
    tmp_path = ROOT / case  # the same path every run: a manifest and a split adapter record where the source lay
    shutil.rmtree(tmp_path, ignore_errors=True)
    src = build_fixture(family, tmp_path / "src", quantization=quantization)
    source, plan = load_plan(str(src), backend, options=PlanOptions(**{"vllm_version": VLLM, **options}))
    loras = [glm4_adapter(src, tmp_path / "adapter")] if with_lora else []
    convert(source, plan, tmp_path / "out", max_shard_bytes=SHARD, loras=loras)
    digest = folder_digest(tmp_path / "out")
    shutil.rmtree(tmp_path)
    if RECORD:
        recorded[case] = digest
    assert recorded.get(case) == digest, f"{case}: the prepared folder's bytes changed"
