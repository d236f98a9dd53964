"""Shared test helpers: tiny fixtures built once per session, and running the CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeprep.fixtures import build_fixture
from moeprep.schema.manifest import MANIFEST_NAME, seal_manifest


def rewrite_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    """Edit a prepared folder's moeprep.json as a producer would (seal updated): a legitimately
    different folder, not a tampered one."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    seal_manifest(folder)


SEED_ENV = "MOEPREP_TEST_SEED"


def fresh_seed(nbytes: int = 4) -> int:
    """A fresh random seed for a test's inputs, printed (pytest shows it with a failure); ``MOEPREP_TEST_SEED=N``
    replays seed N."""
    seed = int(os.environ.get(SEED_ENV) or int.from_bytes(os.urandom(nbytes), "little"))
    print(f"seed {seed} ({SEED_ENV}={seed} replays it)")
    return seed


def fresh_bytes(size: int) -> bytes:
    """``size`` random bytes drawn from a ``fresh_seed``."""
    return random.Random(fresh_seed()).randbytes(size)


def with_tensors_cast(
    src: Path, dest: Path, suffix: str | tuple[str, ...], dtype: torch.dtype, jitter: torch.Generator | None = None
) -> Path:
    """A copy of ``src`` whose tensors ending in ``suffix`` are stored in ``dtype`` (with ``jitter``: plus random
    noise below bf16's resolution, so that rounding to bf16 matters)."""
    shutil.copytree(src, dest)

    def changed_tensor(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        return t + torch.rand(t.shape, generator=jitter, dtype=dtype) * t.abs() * 2**-9 if jitter else t

    for shard in dest.glob("*.safetensors"):
        tensors = load_file(shard)
        changed = {name: changed_tensor(t) for name, t in tensors.items() if name.endswith(suffix)}
        if changed:
            save_file({**tensors, **changed}, str(shard), metadata={"format": "pt"})
    return dest


def resaved_by_transformers(src: Path, dest: Path) -> Path:
    """``src`` with its config.json as transformers' own config class saves it (``save_pretrained``)."""
    from transformers import AutoConfig

    shutil.copytree(src, dest)
    AutoConfig.from_pretrained(src).save_pretrained(dest)
    return dest


def saved_by_transformers(model: torch.nn.Module, dest: Path, seed: int, experts_fan_in_dim: int = -1) -> Path:
    """``model`` (a transformers model) with every parameter drawn from ``seed`` (norms near 1, biases small,
    weights with std 1/sqrt(fan in): transformers' own init leaves biases at zero and small models degenerate),
    saved in bf16 by ``save_pretrained`` with a word tokenizer beside it. ``experts_fan_in_dim``: the input
    dimension of 3-D expert tensors (-2 where they are applied as ``x @ W``)."""
    from moeprep.fixtures.tokenizer import write_word_tokenizer

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.05 * noise)
            elif parameter.dim() == 1 or name.endswith("_bias"):
                parameter.copy_(0.05 * noise)
            else:
                fan_in = 1 if "embed_tokens" in name else parameter.shape[-1]
                fan_in = parameter.shape[experts_fan_in_dim] if parameter.dim() == 3 else fan_in
                parameter.copy_(noise / fan_in**0.5)
    model.to(torch.bfloat16).save_pretrained(dest)
    write_word_tokenizer(dest, model.config.vocab_size, model.config.max_position_embeddings)
    return dest


def unquantized_gpt_oss_by_transformers(dest: Path, seed: int) -> Path:
    """A bf16 gpt-oss (no quantization_config: 3-D experts ``gate_up_proj``/``down_proj`` with biases) as
    transformers saves it, with the tiny fixture's dims."""
    from transformers import GptOssConfig, GptOssForCausalLM

    dims = {"hidden_size": 192, "intermediate_size": 192, "head_dim": 64, "num_attention_heads": 4}
    config = GptOssConfig(
        **dims,
        vocab_size=256,
        num_hidden_layers=2,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
    )
    return saved_by_transformers(GptOssForCausalLM(config), dest, seed, experts_fan_in_dim=-2)


def deepseek_style_by_transformers(family: str, dest: Path, seed: int) -> Path:
    """A small DeepSeek-V3 or GLM-4.5 model as transformers saves it: its config counts one MTP layer
    (``num_nextn_predict_layers``' default) but transformers' model has none to save."""
    import transformers

    common = {"vocab_size": 256, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    common |= {"num_key_value_heads": 2, "intermediate_size": 256, "moe_intermediate_size": 64, "n_routed_experts": 8}
    common |= {"num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "topk_group": 1}
    common |= {"max_position_embeddings": 512}
    if family == "deepseek-v3":
        config = transformers.DeepseekV3Config(
            **common, n_group=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=32
        )
        return saved_by_transformers(transformers.DeepseekV3ForCausalLM(config), dest, seed)
    config = transformers.Glm4MoeConfig(**common, n_group=1, head_dim=32)
    return saved_by_transformers(transformers.Glm4MoeForCausalLM(config), dest, seed)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``moeprep ARGS`` in this process (typer's ``CliRunner``, so no interpreter and torch start per call),
    as ``python -m moeprep`` would; an exception that escaped the CLI is written to stderr
    with its traceback, as the interpreter would. ``run_cli_process`` runs the real command."""
    from typer.testing import CliRunner

    from moeprep.cli.app import app

    argv = [str(arg) for arg in args]
    result = CliRunner().invoke(app, argv)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["moeprep", *argv], result.exit_code, result.stdout, stderr)


def run_cli_process(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m moeprep ARGS`` in a new process and capture its output."""
    command = [sys.executable, "-m", "moeprep", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """``tiny(family)`` -> path of that family's tiny fixture, built once per test session."""
    root = tmp_path_factory.mktemp("fixtures")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_fixture(family, root / family)
        return built[family]

    return get
