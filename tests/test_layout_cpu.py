"""Backend ``cpu``: the AMX layout equals vLLM CPU 0.32's own transform (``prepare_mxfp4_moe_layer_for_cpu``:
``torch.ops._C.convert_weight_packed`` / ``convert_scale_packed`` after padding to 32), bitwise, on fresh
random inputs. vLLM's ops run on any x86 CPU, AMX or not. tests/test_convert_mxfp4.py shows that
``convert --backend cpu`` stores exactly these functions applied to the padded checkpoint tensors."""

from __future__ import annotations

import os

import pytest
import torch

from moeprep.layouts import cpu_amx
from moeprep.layouts.padding import pad_to, round_up

pytest.importorskip("vllm")
import vllm._custom_ops  # noqa: E402, F401  (registers torch.ops._C)
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_mxfp4_moe_layer_for_cpu  # noqa: E402

# (experts, rows N, reduction K): gpt-oss-20b/120b w13 (2I x H) and w2 (H x I), tiny, not multiples of 32
SHAPES = [(2, 5760, 2880), (2, 2880, 2880), (3, 384, 192), (2, 200, 320), (1, 40, 64)]


@pytest.mark.parametrize(("experts", "rows", "k"), SHAPES)
def test_cpu_layout_equals_vllm_cpu_transform(experts: int, rows: int, k: int) -> None:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    blocks = torch.randint(0, 256, (experts, rows, k // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 140, (experts, rows, k // 32), generator=gen, dtype=torch.uint8)
    padded_rows, padded_k = round_up(rows, 32), round_up(k, 32)
    weight = pad_to(blocks.reshape(experts, rows, -1), (experts, padded_rows, padded_k // 2))
    scale = pad_to(scales, (experts, padded_rows, padded_k // 32))
    ref_weight, _, ref_scale, _ = prepare_mxfp4_moe_layer_for_cpu(weight, weight, scale, scale)
    assert torch.equal(cpu_amx.pack_cpu_weight(weight), ref_weight.view(torch.uint8))
    assert torch.equal(cpu_amx.pack_cpu_scale(scale), ref_scale.view(torch.uint8))
