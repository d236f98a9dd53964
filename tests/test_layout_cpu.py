"""Backend ``cpu``: the AMX layout equals vLLM CPU 0.32's own transform (``prepare_mxfp4_moe_layer_for_cpu``:
``torch.ops._C.convert_weight_packed`` / ``convert_scale_packed`` after padding to 32), bitwise, on fresh random
inputs. vLLM CPU has those ops only in the library it loads on CPUs with AVX512-BF16 (``vllm/_C.abi3.so``); on
other CPUs the comparison is skipped (scripts/make_golden_cpu_amx.py records it for such machines).
tests/test_convert_mxfp4.py shows that ``convert --backend cpu`` stores exactly these functions applied to the
padded checkpoint tensors."""

from __future__ import annotations

import pytest
import torch

from moeprep.layouts import cpu_amx
from tests.conftest import fresh_seed
from tests.golden_inputs import CPU_AMX_CASES, cpu_amx_inputs


def vllm_cpu_pack():
    """vLLM CPU's ``prepare_mxfp4_moe_layer_for_cpu`` where this vLLM build has its ops, else skip."""
    pytest.importorskip("vllm")
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

    if not hasattr(torch.ops._C, "convert_weight_packed"):
        pytest.skip("this vLLM CPU build has no convert_weight_packed (its AVX512-BF16 build only)")
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import prepare_mxfp4_moe_layer_for_cpu

    return prepare_mxfp4_moe_layer_for_cpu


@pytest.mark.parametrize(("experts", "rows", "k"), [case[1:] for case in CPU_AMX_CASES])
def test_cpu_layout_equals_the_running_vllm_cpu_transform(experts: int, rows: int, k: int) -> None:
    prepare = vllm_cpu_pack()
    seed = fresh_seed()
    weight, scale = cpu_amx_inputs(seed, experts, rows, k)  # zero-padded to 32 as vLLM's parameters are
    ref_weight, _, ref_scale, _ = prepare(weight, weight, scale, scale)
    assert torch.equal(cpu_amx.pack_cpu_weight(weight), ref_weight.view(torch.uint8))
    assert torch.equal(cpu_amx.pack_cpu_scale(scale), ref_scale.view(torch.uint8))
