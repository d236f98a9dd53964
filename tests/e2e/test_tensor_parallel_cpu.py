"""``convert --tp 2`` served by vLLM CPU with tensor parallelism 2 (one core per rank): each rank fills its
experts from its own files, and greedy tokens (float32) equal the original checkpoint's served the same way,
fused shared-expert slots included (sliced per rank like the routed experts, or sliced by vLLM from a
single-partition fused folder); a folder converted for TP 2 is refused at any other size; an expert-parallel
folder (``convert --ep 2``) served with expert parallelism over the two ranks generates the same tokens, with
fused shared-expert replicas spread over the ranks too. gpt-oss: dequant rank folders against the single-partition
folder, and on CPUs with AMX the cpu layout's rank folders against the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.e2e.vllm_server import run_until_exit, serve_and_generate

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def original_tp2(tiny, tmp_path_factory: pytest.TempPathFactory):
    """``original_tp2(family)``: greedy generations of the original tiny fixture at TP 2 (float32), served once."""
    generations: dict[str, list] = {}

    def get(family: str) -> list:
        if family not in generations:
            log = tmp_path_factory.mktemp("original") / f"{family}.log"
            generations[family] = serve_and_generate(tiny(family), log, dtype="float32", tp=2)
        return generations[family]

    return get


@pytest.mark.parametrize("family", ["glm4-moe", "qwen2-moe"])
def test_tp2_folder_generates_the_original_tokens_reading_only_its_rank_files(
    tiny, original_tp2, tmp_path: Path, family: str
) -> None:
    prepared = tmp_path / "tp2"
    result = run_cli("convert", tiny(family), prepared, "--tp", "2")
    assert result.returncode == 0, result.stderr
    original = original_tp2(family)
    served = serve_and_generate(prepared, tmp_path / "prepared.log", dtype="float32", tp=2)
    assert served == original
    assert all(len(set(tokens)) > 4 for tokens in original), "degenerate generations cannot tell models apart"
    # vLLM prints INFO lines of the first worker only: rank 0 read rank 0's file and no other. (Rank 1 opens
    # the files of its own manifest records, which name only rank 1 files: tests/test_rank_shards.py.)
    reads = [line for line in (tmp_path / "prepared.log").read_text().splitlines() if "reads its experts from" in line]
    assert reads and all("Worker_TP0" in line and "model-rank-0-part-" in line for line in reads), reads


def test_gpt_oss_dequant_tp2_and_ep2_folders_generate_the_tokens_of_the_single_partition_folder(
    tiny, tmp_path: Path
) -> None:
    """vLLM CPU cannot serve the original gpt-oss (no mxfp4 MoE kernel without AMX), so the reference is the
    single-partition dequant folder at TP 1 (itself checked against transformers in test_gpt_oss_cpu.py), in
    float32. With ``--tp 2`` each rank's file holds its share cut and padded as vLLM's gpt-oss loader does
    (tests/test_mxfp4_tensor_parallel.py); the down bias sits on rank 0 only, so the summed outputs count it once.
    With ``--ep 2`` each rank's file holds its whole experts (vLLM's linear placement), served with expert
    parallelism over the two ranks."""
    folders = {"single": [], "tp2": ["--tp", "2"], "ep2": ["--ep", "2"]}
    for name, extra in folders.items():
        result = run_cli("convert", tiny("gpt-oss"), tmp_path / name, "--backend", "dequant", *extra)
        assert result.returncode == 0, result.stderr
    reference = serve_and_generate(tmp_path / "single", tmp_path / "single.log", max_tokens=64, dtype="float32")
    assert all(len(set(tokens)) > 4 for tokens in reference), "degenerate generations cannot tell models apart"
    for name, extra in (("tp2", []), ("ep2", ["--enable-expert-parallel"])):
        log = tmp_path / f"{name}.log"
        served = serve_and_generate(tmp_path / name, log, max_tokens=64, dtype="float32", tp=2, extra=extra)
        assert served == reference, name
        reads = [line for line in log.read_text().splitlines() if "reads its experts from" in line]
        assert reads and all("Worker_TP0" in line and "model-rank-0-part-" in line for line in reads), reads


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="vLLM CPU's mxfp4 MoE kernel needs AMX tiles")
def test_gpt_oss_cpu_layout_tp2_folder_generates_the_original_tokens_on_an_amx_cpu(tiny, tmp_path: Path) -> None:
    """On a CPU with AMX vLLM CPU serves the original gpt-oss at TP 2 itself: each rank cuts, pads and packs its
    share of the experts at load. ``convert --tp 2`` (backend auto: cpu there) stores each rank's share packed in
    its own files, and the folder serves the original's greedy tokens (bf16, the activations vLLM's AMX kernel
    takes), each rank reading only its own files."""
    prepared = tmp_path / "tp2"
    result = run_cli("convert", tiny("gpt-oss"), prepared, "--tp", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("backend cpu:"), result.stdout
    original = serve_and_generate(tiny("gpt-oss"), tmp_path / "original.log", max_tokens=64, tp=2)
    served = serve_and_generate(prepared, tmp_path / "prepared.log", max_tokens=64, tp=2)
    assert all(len(set(tokens)) > 4 for tokens in original), "degenerate generations cannot tell models apart"
    assert served == original
    reads = [line for line in (tmp_path / "prepared.log").read_text().splitlines() if "reads its experts from" in line]
    assert reads and all("Worker_TP0" in line and "model-rank-0-part-" in line for line in reads), reads


@pytest.mark.parametrize("tp_files", [True, False], ids=["rank-files", "single-partition"])
def test_fused_shared_experts_at_tp2_generate_the_original_tokens(
    tiny, original_tp2, tmp_path: Path, tp_files: bool
) -> None:
    """GLM-4-MoE (whose original at TP 2 the first test serves already); DeepSeek-V3 and Qwen2-MoE slot slices
    are checked bitwise per rank in tests/test_rank_shards.py."""
    prepared = tmp_path / "fused"
    extra = ["--tp", "2"] if tp_files else []
    result = run_cli("convert", tiny("glm4-moe"), prepared, "--fuse-shared-experts", *extra)
    assert result.returncode == 0, result.stderr
    served = serve_and_generate(prepared, tmp_path / "fused.log", dtype="float32", tp=2)
    original = original_tp2("glm4-moe")
    assert served == original
    assert all(len(set(tokens)) > 4 for tokens in original), "degenerate generations cannot tell models apart"


def test_tp2_folder_is_refused_at_tensor_parallel_size_1(tiny, tmp_path: Path) -> None:
    prepared = tmp_path / "tp2"
    assert run_cli("convert", tiny("glm4-moe"), prepared, "--tp", "2").returncode == 0
    code, output = run_until_exit(prepared, tmp_path / "tp1.log")
    assert code != 0 and "prepared for tensor parallel size 2, running with 1" in output


@pytest.mark.parametrize("family", ["glm4-moe", "qwen2-moe"])
def test_ep2_folder_generates_the_original_tokens_reading_only_its_rank_files(
    tiny, original_tp2, tmp_path: Path, family: str
) -> None:
    """Expert parallelism over the two TP ranks: each rank fills its whole experts (vLLM's linear placement) from
    its own file. vLLM CPU 0.32 cannot serve the original under expert parallelism (its unquantized MoE kernel
    ignores the expert map and crashes), so the reference is the original at TP 2 without it, in float32."""
    prepared = tmp_path / "ep2"
    assert run_cli("convert", tiny(family), prepared, "--ep", "2").returncode == 0
    log = tmp_path / "ep.log"
    served = serve_and_generate(prepared, log, dtype="float32", tp=2, extra=["--enable-expert-parallel"])
    assert "Expert parallelism is enabled" in log.read_text()
    assert served == original_tp2(family)
    reads = [line for line in log.read_text().splitlines() if "reads its experts from" in line]
    assert reads and all("Worker_TP0_EP0" in line and "model-rank-0-part-" in line for line in reads), reads


def test_fused_shared_replicas_spread_over_ep2_generate_the_original_tokens(tiny, original_tp2, tmp_path: Path) -> None:
    """``--ep 2 --fuse-shared-experts=2`` on GLM-4-MoE: each rank holds four routed experts and one replica of the
    shared expert (the layer's ids interleaved, the router's ids mapped by the contract), and every token runs the
    shared expert on one rank (replica ``token % 2``)."""
    prepared = tmp_path / "fused-ep2"
    result = run_cli("convert", tiny("glm4-moe"), prepared, "--fuse-shared-experts=2", "--ep", "2")
    assert result.returncode == 0, result.stderr
    log = tmp_path / "fused-ep.log"
    served = serve_and_generate(prepared, log, dtype="float32", tp=2, extra=["--enable-expert-parallel"])
    assert served == original_tp2("glm4-moe")
    reads = [line for line in log.read_text().splitlines() if "reads its experts from" in line]
    assert reads and all("Worker_TP0_EP0" in line and "model-rank-0-part-" in line for line in reads), reads
