"""MoE LoRA adapters in -> the expert adapter layout vLLM loads, matched to a prepared base.

Inputs (all PEFT-style ``lora_A`` [r, in] / ``lora_B`` [out, r] pairs):
- ``target_parameters`` adapters on fused 3-D experts (PEFT >= 0.18, transformers v5): one pair per
  parameter of ``...experts``, A [r*E, in] expert-major, B [out, r*E] expert-minor (PEFT's ParamWrapper),
  the first targeted parameter under ``...experts.base_layer``;
- per-expert module adapters ``...experts.{e}.{gate_proj,up_proj,down_proj}`` (or ``w1``, ``w3``, ``w2``);
- per-expert fused ``...experts.{e}.gate_up_proj`` adapters.
Fused gate_up LoRAs are split into gate and up (rows interleaved for gpt-oss, else halves) sharing A.
Output, padded to the prepared base's hidden/intermediate sizes, one rank and one scaling for the whole
adapter (vLLM ignores ``rank_pattern``/``alpha_pattern``), every other module passed through:
- per-expert ``...experts.{e}.{gate,up,down}`` modules under the names the family's vLLM model loads;
- for families vLLM serves with 3-D expert LoRA (gpt-oss), the 3-D layout it loads natively:
  ``...experts.base_layer`` (gate_up, rows in the kernel's w13 order, interleaved for gpt-oss) and
  ``...experts`` (down), A [E*r, in] expert-major, B [out, r*E] expert-minor. vLLM 0.26's per-expert
  path (``--enable-mixed-moe-lora-format``) adds the gate and up deltas to the two halves of w13's
  output, which is wrong for gpt-oss's interleaved kernels, so it is not used there.
For a base converted with ``--tp N`` the adapter stays whole: vLLM slices MoE LoRA per rank at load
(B rows of gate/up and A columns of down by ``[r*I/N, (r+1)*I/N)``), the very slices ``convert --tp`` writes
into rank r's files, so one adapter fits every rank. Expert-parallel bases are refused (not served yet).
Every input tensor is consumed or named in an error.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moeprep.checkpoint.writer import AtomicFolder, write_json
from moeprep.errors import option
from moeprep.families import Family, family_for_config
from moeprep.families.config_view import config_view
from moeprep.layouts.padding import pad_to, round_up
from moeprep.lora.adapter import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    AdapterConfig,
    LoraError,
    LoraPair,
    load_adapter_config,
    load_adapter_tensors,
)
from moeprep.plan import mxfp4_layout
from moeprep.schema.manifest import LORA_RECORD_NAME, Target, load_manifest, manifest_sha256
from moeprep.schema.names import ADAPTER_FUSED_3D, ADAPTER_LAYER, ADAPTER_PER_EXPERT

TARGET_PARAMETERS_3D = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # PEFT's names for the 3-D layout
PROJECTIONS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


@dataclass(frozen=True)
class BaseExperts:
    """What the adapter must fit: the prepared base's experts, as vLLM holds them (padded)."""

    family: Family
    hidden: int
    intermediate: int
    experts: int
    moe_layers: tuple[int, ...]
    hidden_padded: int
    intermediate_padded: int
    location: str
    backend: str
    tp_size: int
    manifest_sha256: str | None
    expert_format: str = "per-expert"

    @classmethod
    def of(cls, prepared: Path) -> BaseExperts:
        """The base of a prepared folder, bound to its manifest by sha256."""
        manifest = load_manifest(prepared)
        if (manifest.routing or {}).get("fused_shared_experts"):
            raise LoraError(
                f"{prepared} has fused shared-expert slots, which MoE LoRA does not cover yet; split the adapter "
                f"for a folder converted without {option('fuse_shared_replicas')}"
            )
        config = json.loads((Path(prepared) / "config.json").read_text(encoding="utf-8"))
        return cls.from_parts(config, manifest.target, manifest.source.location, manifest_sha256(prepared))

    @classmethod
    def from_parts(cls, config: dict, target: Target, location: str, manifest_sha256: str | None) -> BaseExperts:
        """``manifest_sha256`` is None for adapters written into the prepared folder itself (its manifest
        records their files instead)."""
        family = family_for_config(config)
        config = config_view(config)
        moe = family.moe_spec(config)
        if target.ep_size != 1:
            raise LoraError(
                f"the base is prepared for expert parallelism {target.ep_size}, which moeprep does not serve yet; "
                f"split the adapter for a folder converted without {option('ep_size')}"
            )
        hidden, inter = int(config["hidden_size"]), moe.expert_intermediate
        return cls(
            family,
            hidden,
            inter,
            moe.num_experts,
            moe.moe_layers,
            round_up(hidden, target.padding.get("hidden", 1)),
            round_up(inter, target.padding.get("intermediate", 1)),
            location,
            target.backend,
            target.tp_size,
            manifest_sha256,
            moe.expert_format,
        )


@dataclass(frozen=True)
class SplitReport:
    input_tensors: int
    expert_modules: int
    passthrough_modules: int
    rank: int
    scaling: float
    serve_flags: tuple[str, ...]  # what vLLM needs besides --enable-lora to load it
    note: str | None = None  # what stands in the way of serving it on some vLLM releases


class ExpertLoras:
    """Per-expert LoRAs collected from any input form, checked against the base as they come in."""

    def __init__(self, base: BaseExperts, where: str) -> None:
        self.base, self.where = base, where
        self.pairs: dict[tuple[str, int, str], LoraPair] = {}

    def add(self, prefix: str, expert: int, proj: str, pair: LoraPair, module: str) -> None:
        base = self.base
        layer = ADAPTER_LAYER.search(prefix + ".")
        if layer is None or int(layer.group(1)) not in base.moe_layers:
            raise LoraError(f"{self.where}: {module!r} is not in a MoE layer of the base ({base.location})")
        if not 0 <= expert < base.experts:
            raise LoraError(f"{self.where}: {module!r} names expert {expert}; the base has {base.experts}")
        rows, cols = (base.hidden, base.intermediate) if proj == "down" else (base.intermediate, base.hidden)
        if proj == "gate_up":
            rows *= 2
        if (pair.b.shape[0], pair.a.shape[1]) != (rows, cols):
            raise LoraError(
                f"{self.where}: {module!r} maps {pair.a.shape[1]} -> {pair.b.shape[0]} features; the base's {proj} "
                f"projection maps {cols} -> {rows}: this adapter was trained for another base model"
            )
        if proj == "gate_up":
            b = pair.b
            gate, up = (b[0::2], b[1::2]) if base.family.gate_up_interleaved else (b[: rows // 2], b[rows // 2 :])
            self.add(prefix, expert, "gate", LoraPair(pair.a, gate.contiguous(), pair.scaling), module)
            self.add(prefix, expert, "up", LoraPair(pair.a, up.contiguous(), pair.scaling), module)
            return
        key = (prefix, expert, proj)
        if key in self.pairs:
            raise LoraError(f"{self.where}: expert {expert} {proj} of {prefix!r} is given twice ({module!r})")
        self.pairs[key] = pair

    def padded(self) -> dict[tuple[str, int, str], LoraPair]:
        """``{(experts prefix, expert, gate|up|down): pair}`` zero-padded to the base's padded sizes."""
        h, i = self.base.hidden_padded, self.base.intermediate_padded
        out = {}
        for (prefix, expert, proj), pair in sorted(self.pairs.items()):
            rows, cols = (h, i) if proj == "down" else (i, h)
            out[prefix, expert, proj] = LoraPair(
                pad_to(pair.a, (pair.a.shape[0], cols)), pad_to(pair.b, (rows, pair.b.shape[1])), pair.scaling
            )
        return out

    def per_expert_modules(self) -> dict[str, LoraPair]:
        """Output modules: gate/up/down of every expert under vLLM's names."""
        names = dict(zip(("gate", "up", "down"), self.base.family.expert_lora_modules, strict=True))
        return {f"{prefix}.{e}.{names[proj]}": pair for (prefix, e, proj), pair in self.padded().items()}

    def gate_up_and_down(self) -> dict[tuple[str, int, str], LoraPair]:
        """``{(prefix, expert, gate_up|down): pair}``: each expert's gate and up joined into one w13 LoRA whose
        B rows follow the kernel's w13 order (interleaved for gpt-oss, else [gate; up]); gate and up share A
        when the adapter gave them one, else their ranks are stacked (exact either way)."""
        pairs = self.padded()
        out = {}
        for prefix, e, proj in pairs:
            if proj == "down":
                out[prefix, e, "down"] = pairs[prefix, e, "down"]
            elif (prefix, e, "gate_up") not in out:
                out[prefix, e, "gate_up"] = self._joined(pairs.get((prefix, e, "gate")), pairs.get((prefix, e, "up")))
        return out

    def _joined(self, gate: LoraPair | None, up: LoraPair | None) -> LoraPair:
        i, h = self.base.intermediate_padded, self.base.hidden_padded
        present = gate or up
        assert present is not None
        gate = gate or LoraPair(present.a.new_zeros(0, h), present.b.new_zeros(i, 0), present.scaling)
        up = up or LoraPair(present.a.new_zeros(0, h), present.b.new_zeros(i, 0), present.scaling)
        up_b = b_at_scaling(up, gate.scaling)
        if torch.equal(gate.a, up.a):
            a, gate_b = gate.a, gate.b
        else:  # rank r_gate + r_up: [A_gate; A_up] with B_gate [B_gate, 0] and B_up [0, B_up]
            a = torch.cat([gate.a, up.a])
            gate_b = torch.cat([gate.b, gate.b.new_zeros(i, up.a.shape[0])], 1)
            up_b = torch.cat([up_b.new_zeros(i, gate.a.shape[0]), up_b], 1)
        if self.base.family.gate_up_interleaved:
            b = torch.stack([gate_b, up_b], 1).reshape(2 * i, a.shape[0])
        else:
            b = torch.cat([gate_b, up_b])
        return LoraPair(a, b, gate.scaling)


def collect(adapter: Path, config: AdapterConfig, base: BaseExperts) -> tuple[ExpertLoras, dict[str, LoraPair], int]:
    """(expert LoRAs, other modules, input tensor count) of the adapter, every tensor accounted for."""
    where = str(Path(adapter) / WEIGHTS_NAME)
    experts, others = ExpertLoras(base, where), {}
    tensors_by_module = load_adapter_tensors(adapter)
    for module, tensors in sorted(tensors_by_module.items()):
        a, b = tensors["A"], tensors["B"]
        if match := ADAPTER_PER_EXPERT.fullmatch(module):
            proj = PROJECTIONS.get(match["proj"], "gate_up" if match["proj"] == "gate_up_proj" else None)
            if proj is None:
                raise LoraError(f"{where}: expert module {module!r} is not a gate/up/down projection")
            _check_rank(config, module, a.shape[0], 1, where)
            pair = LoraPair(a, b, config.scaling(module))
            experts.add(match["prefix"], int(match["expert"]), proj, pair, module)
        elif match := ADAPTER_FUSED_3D.fullmatch(module):
            if not config.target_parameters:
                raise LoraError(f"{where}: {module!r} looks like a 3-D experts LoRA but target_parameters is empty")
            _add_fused_3d(experts, match["prefix"], module, a, b, config, where)
        elif ".experts." in f"{module}.":
            raise LoraError(f"{where}: expert LoRA module {module!r} has a layout moeprep does not know")
        else:
            _check_rank(config, module, a.shape[0], 1, where)
            others[module] = LoraPair(a, b, config.scaling(module))
    return experts, others, 2 * len(tensors_by_module)


def _check_rank(config: AdapterConfig, key: str, rows: int, experts: int, where: str) -> None:
    rank = config.rank_for(key)
    if rows != rank * experts:
        raise LoraError(
            f"{where}: {key!r} has {rows} lora_A rows; adapter_config.json implies rank {rank} x {experts} expert(s): "
            "the config does not describe these tensors"
        )


def _add_fused_3d(
    experts: ExpertLoras, prefix: str, module: str, a: torch.Tensor, b: torch.Tensor, config: AdapterConfig, where: str
) -> None:
    """PEFT ParamWrapper: A [r*E, in] (expert-major), B [out, r*E] (expert-minor); the parameter is told by
    its shape (gate_up: H -> 2I, down: I -> H)."""
    base = experts.base
    n = base.experts
    shape = (b.shape[0], a.shape[1])
    param = {(2 * base.intermediate, base.hidden): "gate_up", (base.hidden, base.intermediate): "down"}.get(shape)
    if param is None or a.shape[0] % n:
        raise LoraError(
            f"{where}: {module!r} maps {a.shape[1]} -> {b.shape[0]} features over {a.shape[0]} rows; the base's "
            f"{n} experts take gate_up {base.hidden} -> {2 * base.intermediate} and down {base.intermediate} -> "
            f"{base.hidden}: this adapter was trained for another base model"
        )
    key = f"{prefix}.{param}_proj"
    _check_rank(config, key, a.shape[0], n, where)
    rank, scaling = config.rank_for(key), config.scaling(key)
    per_a = a.reshape(n, rank, a.shape[1])
    per_b = b.reshape(b.shape[0], rank, n)
    for e in range(n):
        pair = LoraPair(per_a[e].contiguous(), per_b[:, :, e].contiguous(), scaling)
        experts.add(prefix, e, param, pair, module)


def b_at_scaling(pair: LoraPair, scaling: float) -> torch.Tensor:
    """``pair``'s B with its own scaling folded in, so that ``scaling * B @ A`` is the pair's update."""
    return pair.b if pair.scaling == scaling else (pair.b.float() * (pair.scaling / scaling)).to(pair.b.dtype)


def unify(modules: dict[str, LoraPair]) -> tuple[int, float, dict[str, LoraPair]]:
    """One rank (the largest; smaller ones zero-padded) and one scaling (the most common; other modules'
    scaling folded into B) for the whole adapter, since vLLM applies a single ``lora_alpha / r``."""
    rank = max(p.a.shape[0] for p in modules.values())
    scaling = Counter(p.scaling for p in modules.values()).most_common(1)[0][0]
    out = {}
    for name, p in modules.items():
        b = b_at_scaling(p, scaling)
        out[name] = LoraPair(pad_to(p.a, (rank, p.a.shape[1])), pad_to(b, (b.shape[0], rank)), scaling)
    return rank, scaling, out


def split_adapter(adapter: Path, prepared: Path, out: Path, overwrite: bool = False) -> SplitReport:
    """Write the per-expert adapter for the prepared base at ``prepared`` into ``out`` (atomically)."""
    base = BaseExperts.of(prepared)
    with AtomicFolder(out, overwrite, [adapter, prepared]) as tmp:
        return write_split(adapter, base, tmp)


def write_split(adapter: Path, base: BaseExperts, folder: Path) -> SplitReport:
    """Write the per-expert adapter for ``base`` into the (new or empty) ``folder``."""
    if (Path(adapter) / LORA_RECORD_NAME).is_file():
        raise LoraError(
            f"{adapter} was already split by moeprep ({LORA_RECORD_NAME}); split the original adapter instead"
        )
    config = load_adapter_config(adapter)
    expert_loras, others, inputs = collect(adapter, config, base)
    if not expert_loras.pairs:
        raise LoraError(f"{adapter}: no expert LoRA found; use the adapter with vLLM as it is")
    three_d = base.family.vllm_3d_expert_lora
    if three_d:
        joined = expert_loras.gate_up_and_down()
        experts = {_key_name(key): pair for key, pair in joined.items()}
    else:
        experts = expert_loras.per_expert_modules()
    rank, scaling, modules = unify({**experts, **others})
    if three_d:
        prefixes = sorted({prefix for prefix, _, _ in joined})
        modules = {**stacked_3d(modules, prefixes, base, rank), **{m: modules[m] for m in others}}
    targets = sorted({name.rpartition(".")[2] for name in modules} - {"base_layer"})
    tensors = {}
    for name, pair in sorted(modules.items()):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = pair.a.clone()  # gate and up share A: own copies
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = pair.b.clone()
    new_config = {
        **config.raw,
        "r": rank,
        "lora_alpha": scaling * rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_parameters": list(TARGET_PARAMETERS_3D) if three_d else None,
        "target_modules": targets,
        "base_model_name_or_path": base.location,
    }
    record = {
        "base_manifest_sha256": base.manifest_sha256,
        "base": base.location,
        "backend": base.backend,
        "padded_to": {"hidden": base.hidden_padded, "intermediate": base.intermediate_padded},
        "tensor_parallel_size": base.tp_size,  # vLLM slices the whole adapter per rank as the base's rank files
        "source_adapter": str(Path(adapter).absolute()),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, new_config)
    write_json(folder / LORA_RECORD_NAME, record)
    # vLLM 0.26 wraps gpt-oss's qkv projection for LoRA whatever the adapter holds, and its LoRA kernel then
    # fails an is_contiguous() assertion there: only the adapter's own modules may be wrapped.
    backend_flags, note = _backend_lora(base.backend, base.expert_format)
    flags = (
        *backend_flags,
        *(("--lora-target-modules", *targets) if three_d else ()),
    )
    if base.tp_size > 1:
        flags += ("--tensor-parallel-size", str(base.tp_size))
    return SplitReport(inputs, len(experts), len(others), rank, scaling, flags, note)


def _backend_lora(backend: str, expert_format: str) -> tuple[tuple[str, ...], str | None]:
    """The MoE kernel choice vLLM needs to apply LoRA on this backend's prepared layouts, and what stands in its
    way on some vLLM releases."""
    layout = mxfp4_layout(backend, expert_format)
    return (layout.lora_serve_flags, layout.lora_note) if layout is not None else ((), None)


def _key_name(key: tuple[str, int, str]) -> str:
    prefix, expert, proj = key
    return f"{prefix}.{expert}.{proj}"


def stacked_3d(modules: dict[str, LoraPair], prefixes: list[str], base: BaseExperts, rank: int) -> dict[str, LoraPair]:
    """vLLM's 3-D expert LoRA modules from the per-expert (rank-unified) ones: per experts ``prefix``, ``.base_layer``
    (gate_up) and ``{prefix}`` (down), A [E*r, in] with expert e in rows e*r..e*r+r-1, B [out, r*E] with
    expert e in columns j*E+e; experts the adapter leaves out are zeros."""
    h, i = base.hidden_padded, base.intermediate_padded
    some = next(iter(modules.values()))
    shapes = {"gate_up": ((rank, h), (2 * i, rank)), "down": ((rank, i), (h, rank))}
    out = {}
    for prefix in prefixes:
        for proj, module in (("gate_up", f"{prefix}.base_layer"), ("down", prefix)):
            a_shape, b_shape = shapes[proj]
            zero = LoraPair(some.a.new_zeros(a_shape), some.b.new_zeros(b_shape), some.scaling)
            pairs = [modules.get(_key_name((prefix, e, proj)), zero) for e in range(base.experts)]
            a = torch.cat([p.a for p in pairs])
            b = torch.stack([p.b for p in pairs], -1).reshape(b_shape[0], rank * base.experts)
            out[module] = LoraPair(a, b, some.scaling)
    return out
