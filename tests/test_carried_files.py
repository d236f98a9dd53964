"""Every file of the source that is not a weight file lands in the prepared folder byte for byte, is listed
in the manifest and covered by ``verify``; other copies of the weights (gpt-oss's ``original/``) are left out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeprep.checkpoint.source import carried_files
from moeprep.schema.manifest import load_manifest
from tests.conftest import run_cli

# What released repos ship beside their weights (Kimi-K2, DeepSeek-V3, gpt-oss, Llama 4 ...)
EXTRA = {
    "tokenization_kimi.py": b"# remote tokenizer code\nclass TikTokenTokenizer: ...\n",
    "configuration_deepseek.py": b"# remote config code\n",
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "LICENSE": b"MIT License\n",
    "README.md": b"# The source model\n",
    "figures/benchmark.png": bytes(range(256)),
    "original/config.json": b'{"num_hidden_layers": 24}',
    "original/model.safetensors": b"\0" * 64,
    "metal/model.bin": b"\1" * 64,
    ".cache/huggingface/download/x.metadata": b"local download bookkeeping",
}


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("carried") / "src"
    shutil.copytree(tiny("qwen2-moe"), folder)
    for name, data in EXTRA.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def prepared(source: Path) -> tuple[Path, str]:
    dest = source.parent / "prepared"
    result = run_cli("convert", source, dest)
    assert result.returncode == 0, result.stderr
    return dest, result.stdout


def test_non_weight_files_are_carried_byte_for_byte(source: Path, prepared: tuple[Path, str]) -> None:
    dest, _ = prepared
    for name in ("tokenization_kimi.py", "configuration_deepseek.py", "chat_template.jinja", "LICENSE"):
        assert (dest / name).read_bytes() == EXTRA[name], name
    assert (dest / "figures/benchmark.png").read_bytes() == EXTRA["figures/benchmark.png"]
    assert (dest / "README.source.md").read_bytes() == EXTRA["README.md"]
    card = (dest / "README.md").read_text()  # the prepared folder's model card
    assert card.startswith("---\n") and "its model card is `README.source.md`" in card
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dest / name).read_bytes() == (source / name).read_bytes(), name


def test_other_weight_copies_and_hidden_paths_are_left_out_and_said(prepared: tuple[Path, str]) -> None:
    dest, stdout = prepared
    assert not (dest / "original").exists() and not (dest / "metal").exists() and not (dest / ".cache").exists()
    assert "left out metal/: it holds another copy of the weights" in stdout
    assert "left out original/: it holds another copy of the weights" in stdout


def test_manifest_lists_carried_files_and_verify_covers_them(source: Path, prepared: tuple[Path, str]) -> None:
    dest, _ = prepared
    manifest = load_manifest(dest)
    for name in ("tokenization_kimi.py", "figures/benchmark.png", "README.source.md", "LICENSE"):
        assert name in manifest.files, name
    assert "tokenization_kimi.py" in manifest.source.files and "README.md" in manifest.source.files
    assert run_cli("verify", dest).returncode == 0
    tampered = dest.parent / "tampered"
    shutil.copytree(dest, tampered)
    (tampered / "tokenization_kimi.py").write_bytes(b"# changed\n")
    result = run_cli("verify", tampered)
    assert result.returncode == 2 and "tokenization_kimi.py" in result.stderr


def test_carried_files_rule() -> None:
    names = [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "tokenizer.model",
        "a/b/notes.txt",
        "a/weights/model.gguf",
        "a/weights/readme.txt",
        ".gitattributes",
        "moeprep.json",
    ]
    assert carried_files(names) == (["a/b/notes.txt", "tokenizer.model"], ["a/weights"])
