"""gpt-oss mxfp4 experts dequantized by moeprep, for CPUs where vLLM has no mxfp4 MoE kernel (vLLM CPU's needs AMX).

Serves folders prepared with ``--backend dequant``: the experts keep the checkpoint's bytes
(``moeprep_w13_weight`` [E, 2I, H/2] u8, two e2m1 per byte, low nibble first; ``moeprep_w13_scale``
[E, 2I, H/32] e8m0; gate/up rows interleaved; bf16 biases). Each forward dequantizes only the experts
its tokens were routed to, one at a time, and applies gpt-oss's clamped SwiGLU (``swigluoai``) in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from moeprep.runtime.prepared_params import PreparedExpertParams, PreparedWeightsMixin
from moeprep.runtime.tracking import PreparedTensorTracker
from moeprep.schema.manifest import TensorRecord
from moeprep.schema.names import prepared_param_names

logger = init_logger("vllm.moeprep")  # under vLLM's logger, so its handlers print it

MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SWIGLU_ALPHA = 1.702  # gpt-oss: glu = gate * sigmoid(alpha * gate)
SWIGLU_LIMIT = 7.0  # gate clamped above, up clamped to [-limit, limit]


def vllm_cpu_has_mxfp4_moe() -> bool:
    """vLLM CPU's mxfp4 MoE kernel (``CPUExpertsMxfp4``) needs x86 AMX tiles."""
    return bool(torch.cpu._is_amx_tile_supported())


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[N, K/2] u8 packed e2m1 and [N, K/32] u8 e8m0 -> [N, K] float32."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)
    values = values.reshape(blocks.shape[0], -1, MXFP4_BLOCK)
    exponents = scales.to(torch.int32) - 127
    return (values * torch.exp2(exponents.to(torch.float32)).unsqueeze(-1)).reshape(blocks.shape[0], -1)


def swiglu_oai(h: torch.Tensor, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> torch.Tensor:
    """gpt-oss's activation on interleaved [gate0, up0, gate1, up1, ...] columns."""
    gate, up = h[..., 0::2].clamp(max=limit), h[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class DequantMxfp4MoEMethod(PreparedWeightsMixin, FusedMoEMethodBase):
    """Prepared ``dequant`` experts (``moeprep_{w13,w2}_{weight,scale,bias}``), computed by dequantizing
    each routed expert's mxfp4 weights on the fly; nothing is transformed at load."""

    PARAMS = prepared_param_names("weight", "scale", "bias")

    def __init__(
        self,
        moe: Any,
        prefix: str,
        records: dict[str, TensorRecord],
        tracker: PreparedTensorTracker,
        rank_folder: Path | None = None,
    ) -> None:
        """``rank_folder``: the folder whose rank files hold ``records`` (``convert --tp N``)."""
        super().__init__(moe)
        if vllm_cpu_has_mxfp4_moe():
            logger.warning_once(
                "moeprep: this CPU has AMX, where vLLM's own mxfp4 MoE kernel runs faster than the dequant backend "
                "this folder was converted for: convert with --backend auto (the cpu layout) for this machine"
            )
        self.params = PreparedExpertParams(self.PARAMS, prefix, records, tracker)
        self.prefix, self.tracker, self.rank_folder = prefix, tracker, rank_folder
        logger.info_once("moeprep: mxfp4 experts run through moeprep's per-expert dequantization (float32 math)")

    def process_weights_after_loading(self, layer: Any) -> None:
        if self.rank_folder is not None:
            self.params.load_rank_files(layer, self.rank_folder)
        self.params.check_all_loaded()
        self.tracker.layer_ready(self.prefix)

    def get_fused_moe_quant_config(self, layer: Any) -> None:
        return None

    def apply(  # type: ignore[override]
        self,
        layer: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ids = topk_ids.long()
        if layer.expert_map is not None:  # global -> local expert ids; -1 = another rank's expert
            ids = layer.expert_map[ids].long()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        xf = x.to(torch.float32)
        for expert in ids.unique().tolist():
            if expert < 0:
                continue
            token, slot = (ids == expert).nonzero(as_tuple=True)
            w13 = dequantize_mxfp4(layer.moeprep_w13_weight[expert], layer.moeprep_w13_scale[expert])
            w2 = dequantize_mxfp4(layer.moeprep_w2_weight[expert], layer.moeprep_w2_scale[expert])
            h = xf[token] @ w13.T + layer.moeprep_w13_bias[expert].float()
            y = swiglu_oai(h) @ w2.T + layer.moeprep_w2_bias[expert].float()
            out.index_add_(0, token, y * topk_weights[token, slot].float().unsqueeze(-1))
        return out.to(x.dtype)
