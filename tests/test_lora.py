"""``moeprep lora split``: every input form and family gives per-expert LoRAs whose merge equals the
merge of the original adapter (PEFT's own ``merge_and_unload`` for 3-D adapters), padded like the base;
bad adapters are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import peft  # the test extra installs it: PEFT writes the reference adapters
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moeprep.families import get_family
from moeprep.lora.adapter import AdapterConfig, parse_adapter_config
from tests.conftest import fresh_seed, run_cli, unquantized_gpt_oss_by_transformers

PREFIX = "base_model.model."


def prepared(tiny, root: Path, family: str, backend: str) -> Path:
    dest = root / f"{family}-{backend}"
    if not dest.exists():
        result = run_cli("convert", tiny(family), dest, "--backend", backend)
        assert result.returncode == 0, result.stderr
    return dest


def split(adapter: Path, base: Path, out: Path) -> dict[str, torch.Tensor]:
    result = run_cli("lora", "split", adapter, "--base", base, "--out", out)
    assert result.returncode == 0, result.stderr
    return load_file(out / "adapter_model.safetensors")


def split_scaling(out: Path) -> float:
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    return config["lora_alpha"] / config["r"]


def peft_adapter(model_dir: Path, out: Path, **lora: object) -> tuple[torch.nn.Module, Path]:
    """A real PEFT adapter with random (non-zero) A and B, and the PEFT model it came from (float32)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out)
    return peft_model, out


def expert_delta(tensors: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    return scaling * tensors[f"{PREFIX}{module}.lora_B.weight"] @ tensors[f"{PREFIX}{module}.lora_A.weight"]


def gate_up_down_deltas(
    tensors: dict[str, torch.Tensor], experts_module: str, e: int, experts: int, scaling: float, names: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``e``'s gate, up and down updates: from per-expert modules ``names``, or from vLLM's 3-D layout
    (``experts.base_layer`` = gate_up with rows interleaved, ``experts`` = down; A [E*r, in] expert-major,
    B [out, r*E] expert-minor, as vLLM 0.26 reshapes them)."""
    if f"{PREFIX}{experts_module}.base_layer.lora_A.weight" not in tensors:
        return tuple(expert_delta(tensors, f"{experts_module}.{e}.{name}", scaling) for name in names)

    def delta(module: str) -> torch.Tensor:
        a, b = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        return scaling * b.reshape(b.shape[0], -1, experts)[:, :, e] @ a.reshape(experts, -1, a.shape[1])[e]

    gate_up = delta(f"{experts_module}.base_layer")
    return gate_up[0::2], gate_up[1::2], delta(experts_module)


# PEFT turns gate/up/down target_modules on fused 3-D experts into target_parameters, with a rank_pattern
# for gate_up (rank 2r) that vLLM would ignore; or target the parameters directly.
BY_MODULES = {"target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]}
BY_PARAMETERS = {
    "target_modules": ["q_proj"],
    "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
}


@pytest.mark.parametrize(
    ("family", "backend", "targets", "names", "interleaved"),
    [
        ("qwen3-moe", "none", BY_MODULES, ("gate_proj", "up_proj", "down_proj"), False),
        ("qwen3-moe", "none", BY_PARAMETERS, ("gate_proj", "up_proj", "down_proj"), False),
        ("gpt-oss", "triton", BY_PARAMETERS, (), True),  # vLLM's 3-D layout
        ("gpt-oss", "marlin", BY_PARAMETERS, (), True),
        ("gpt-oss", "none", BY_PARAMETERS, (), True),  # padding only
    ],
    ids=["qwen3-moe-modules", "qwen3-moe-parameters", "gpt-oss-triton", "gpt-oss-marlin", "gpt-oss-none"],
)
def test_3d_target_parameters_adapter_merges_like_peft(
    tiny, tmp_path: Path, family: str, backend: str, targets: dict, names: tuple[str, str, str], interleaved: bool
) -> None:
    """PEFT >= 0.18 adapters on fused 3-D experts (transformers v5), merged by PEFT itself as the reference."""
    base = prepared(tiny, tmp_path, family, backend)
    peft_model, adapter = peft_adapter(tiny(family), tmp_path / "adapter", r=4, lora_alpha=8, **targets)
    out = tmp_path / "split"
    tensors = split(adapter, base, out)
    scaling = split_scaling(out)
    config = peft_model.base_model.model.config
    moe = get_family(family).moe_spec(json.loads((base / "config.json").read_text()))
    hidden, inter, experts = config.hidden_size, moe.expert_intermediate, moe.num_experts
    record = json.loads((out / "moeprep_lora.json").read_text())
    h_pad, i_pad = record["padded_to"]["hidden"], record["padded_to"]["intermediate"]
    base_weights = {n: p.detach().clone() for n, p in peft_model.base_model.model.named_parameters() if "lora" not in n}
    merged = peft_model.merge_and_unload()
    for layer in range(config.num_hidden_layers):
        experts_module = merged.model.layers[layer].mlp.experts
        for e in range(experts):
            module = f"model.layers.{layer}.mlp.experts"
            gate, up, down = gate_up_down_deltas(tensors, module, e, experts, scaling, names)
            for delta, rows, cols in ((gate, i_pad, h_pad), (up, i_pad, h_pad), (down, h_pad, i_pad)):
                assert delta.shape == (rows, cols)
            padding_is_zero = [
                gate[inter:],
                gate[:, hidden:],
                up[inter:],
                up[:, hidden:],
                down[hidden:],
                down[:, inter:],
            ]
            assert all(not t.any() for t in padding_is_zero)
            gate, up, down = gate[:inter, :hidden], up[:inter, :hidden], down[:hidden, :inter]
            original_gate_up = base_weights[_peft_param(layer, "gate_up_proj", base_weights)][e]
            original_down = base_weights[_peft_param(layer, "down_proj", base_weights)][e]
            if interleaved:  # gpt-oss: gate_up_proj [E, H, 2I] used as x @ W, gate/up interleaved
                ours = original_gate_up.clone()
                ours[:, 0::2] += gate.T
                ours[:, 1::2] += up.T
                ours_down = original_down + down.T
            else:  # transformers v5 fused experts: gate_up_proj [E, 2I, H] = [gate; up]
                ours = original_gate_up + torch.cat([gate, up])
                ours_down = original_down + down
            torch.testing.assert_close(ours, experts_module.gate_up_proj[e], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ours_down, experts_module.down_proj[e], rtol=1e-6, atol=1e-6)
            assert (ours - original_gate_up).abs().max() > 1e-3  # the adapter changes the experts
    q_name = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    assert q_name in tensors  # attention LoRA passed through


def test_unquantized_gpt_oss_base_takes_the_split_its_mxfp4_twin_takes(tiny, tmp_path: Path) -> None:
    """A gpt-oss saved unquantized (bf16 3-D experts) of the tiny fixture's dims gets, for the same adapter, the
    same split as the mxfp4 fixture prepared as stored: vLLM's gpt-oss LoRA layout does not depend on how the base
    stores its experts."""
    twin = unquantized_gpt_oss_by_transformers(tmp_path / "bf16-src", fresh_seed())
    assert run_cli("convert", twin, tmp_path / "bf16").returncode == 0
    _, adapter = peft_adapter(tiny("gpt-oss"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    from_mxfp4 = split(adapter, prepared(tiny, tmp_path, "gpt-oss", "none"), tmp_path / "split-mxfp4")
    from_bf16 = split(adapter, tmp_path / "bf16", tmp_path / "split-bf16")
    assert from_bf16.keys() == from_mxfp4.keys() and any(".experts." in name for name in from_bf16)
    assert all(torch.equal(from_bf16[name], tensor) for name, tensor in from_mxfp4.items())
    configs = [json.loads((tmp_path / f"split-{k}" / "adapter_config.json").read_text()) for k in ("mxfp4", "bf16")]
    assert [c.pop("base_model_name_or_path") for c in configs] == [str(tiny("gpt-oss")), str(twin)]
    assert configs[0] == configs[1]


def _peft_param(layer: int, name: str, weights: dict[str, torch.Tensor]) -> str:
    return next(n for n in weights if n.startswith(f"model.layers.{layer}.mlp.experts") and n.endswith(f".{name}"))


def per_expert_adapter(
    folder: Path, names: dict[str, tuple[int, int]], experts: int, layers: tuple[int, ...] = (0, 1), rank: int = 3
) -> dict:
    """A hand-made bf16 adapter with ``experts.{e}.{name}`` modules ([out, in] given per name) in ``layers``."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for layer in layers:
        for e in range(experts):
            for name, (rows, cols) in names.items():
                module = f"{PREFIX}model.layers.{layer}.mlp.experts.{e}.{name}"
                tensors[f"{module}.lora_A.weight"] = torch.randn(rank, cols, generator=generator).to(torch.bfloat16)
                tensors[f"{module}.lora_B.weight"] = torch.randn(rows, rank, generator=generator).to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(names)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


@pytest.mark.parametrize("family", ["qwen2-moe", "deepseek-v3"])
def test_per_expert_module_adapter_passes_through_bitwise(tiny, tmp_path: Path, family: str) -> None:
    base = prepared(tiny, tmp_path, family, "none")
    config = json.loads((base / "config.json").read_text())
    moe = get_family(family).moe_spec(config)
    h, i, experts = config["hidden_size"], moe.expert_intermediate, moe.num_experts
    shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    original = per_expert_adapter(tmp_path / "adapter", shapes, experts, layers=moe.moe_layers[:2])
    out = split(tmp_path / "adapter", base, tmp_path / "out")
    assert set(out) == set(original)
    for name, tensor in original.items():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], tensor), name
    assert split_scaling(tmp_path / "out") == 2.0


def test_fused_w13_per_expert_adapter_splits_gate_and_up_bitwise(tiny, tmp_path: Path) -> None:
    base = prepared(tiny, tmp_path, "glm4-moe", "none")
    config = json.loads((base / "config.json").read_text())
    h, i, experts = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"]
    layer = config["first_k_dense_replace"]  # layers before it are dense
    shapes = {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}
    original = per_expert_adapter(tmp_path / "adapter", shapes, experts, layers=(layer, layer + 1))
    out = split(tmp_path / "adapter", base, tmp_path / "out")
    for e in range(experts):
        source = f"{PREFIX}model.layers.{layer}.mlp.experts.{e}"
        b = original[f"{source}.gate_up_proj.lora_B.weight"]
        assert torch.equal(out[f"{source}.gate_proj.lora_B.weight"], b[:i])
        assert torch.equal(out[f"{source}.up_proj.lora_B.weight"], b[i:])
        a = original[f"{source}.gate_up_proj.lora_A.weight"]
        assert torch.equal(out[f"{source}.gate_proj.lora_A.weight"], a)
        assert torch.equal(out[f"{source}.up_proj.lora_A.weight"], a)


@pytest.mark.parametrize("family", ["qwen3-moe", "gpt-oss"])
def test_vllm_lora_loader_keeps_every_tensor(tiny, tmp_path: Path, family: str) -> None:
    """vLLM's own adapter loader reads the split adapter (per-expert, or gpt-oss's 3-D layout) and drops
    nothing (count check)."""
    pytest.importorskip("vllm")
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    base = prepared(tiny, tmp_path, family, "none" if family == "qwen3-moe" else "marlin")
    targets = {**BY_PARAMETERS, "target_modules": ["q_proj", "o_proj"]}
    _, adapter = peft_adapter(tiny(family), tmp_path / "adapter", r=4, lora_alpha=8, **targets)
    out = tmp_path / "split"
    tensors = split(adapter, base, out)
    if family == "gpt-oss":  # vLLM's expected modules for a 3-D MoE model
        expected = {"q_proj", "o_proj", "experts"}
    else:
        experts = json.loads((base / "config.json").read_text())["num_experts"]
        expected = {"q_proj", "o_proj"} | {
            f"experts.{e}.{n}" for e in range(experts) for n in ("gate_proj", "up_proj", "down_proj")
        }
    helper = PEFTHelper.from_local_dir(str(out), max_position_embeddings=512)
    lora = LoRAModel.from_local_checkpoint(str(out), expected, helper, device="cpu", lora_model_id=1)
    assert len(lora.loras) == len(tensors) // 2
    assert helper.vllm_lora_scaling_factor == split_scaling(out)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(use_dora=True), "use_dora"),
        (lambda d: d.update(r=0), "positive rank"),
        (lambda d: d.update(rank_pattern={"(": 4}), "regular expression"),
        (lambda d: d.update(target_modules=[1]), "list of strings"),
        (lambda d: d.update(peft_type="IA3"), "not LORA"),
    ],
)
def test_bad_adapter_configs_are_refused(change, message: str) -> None:
    from moeprep.lora import LoraError

    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    change(data)
    with pytest.raises(LoraError, match=message):
        parse_adapter_config(data, "adapter_config.json")


def test_pattern_overrides_follow_peft() -> None:
    config = parse_adapter_config(
        {"r": 4, "lora_alpha": 8, "rank_pattern": {r".*\.gate_up_proj": 8}, "alpha_pattern": {"q_proj": 2}}, "c"
    )
    assert isinstance(config, AdapterConfig)
    assert config.rank_for("model.layers.0.mlp.experts.gate_up_proj") == 8
    assert config.rank_for("model.layers.0.mlp.experts.down_proj") == 4
    assert config.scaling("model.layers.0.self_attn.q_proj") == 0.5
    assert config.scaling("model.layers.0.self_attn.k_proj") == 2.0


def test_expert_lora_outside_the_moe_layers_is_refused(tiny, tmp_path: Path) -> None:
    base = prepared(tiny, tmp_path, "glm4-moe", "none")
    config = json.loads((base / "config.json").read_text())
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    per_expert_adapter(tmp_path / "adapter", {"down_proj": (h, i)}, config["n_routed_experts"], layers=(0,))
    result = run_cli("lora", "split", tmp_path / "adapter", "--base", base, "--out", tmp_path / "out")
    assert result.returncode == 2 and "is not in a MoE layer" in result.stderr


def test_adapter_for_another_base_is_refused(tiny, tmp_path: Path) -> None:
    base = prepared(tiny, tmp_path, "gpt-oss", "triton")
    _, adapter = peft_adapter(tiny("qwen3-moe"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    result = run_cli("lora", "split", adapter, "--base", base, "--out", tmp_path / "out")
    assert result.returncode == 2 and "trained for another base" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.embed_tokens.lora_embedding_A": torch.ones(4, 8)}, "lora_embedding_A"),
        ({"model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(4, 8)}, "not its partner"),
        (
            {
                "model.layers.0.mlp.experts.0.gate_proj.lora_A.weight": torch.ones(5, 8),
                "model.layers.0.mlp.experts.0.gate_proj.lora_B.weight": torch.ones(8, 5),
            },
            "rank 3",
        ),
    ],
    ids=["embedding", "missing-partner", "rank-mismatch"],
)
def test_unknown_or_inconsistent_tensors_are_named(tiny, tmp_path: Path, extra: dict, message: str) -> None:
    base = prepared(tiny, tmp_path, "qwen2-moe", "none")
    config = json.loads((base / "config.json").read_text())
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    tensors = per_expert_adapter(tmp_path / "adapter", {"down_proj": (h, i)}, config["num_experts"])
    tensors.update({PREFIX + name: t for name, t in extra.items()})
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    result = run_cli("lora", "split", tmp_path / "adapter", "--base", base, "--out", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_convert_with_lora_writes_the_split_adapter_into_the_verified_folder(tiny, tmp_path: Path) -> None:
    _, adapter = peft_adapter(tiny("gpt-oss"), tmp_path / "my-adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    dest = tmp_path / "prepared"
    result = run_cli("convert", tiny("gpt-oss"), dest, "--backend", "triton", "--lora", adapter)
    assert result.returncode == 0, result.stderr
    standalone = split(adapter, dest, tmp_path / "standalone")
    inside = load_file(dest / "lora" / "my-adapter" / "adapter_model.safetensors")
    assert inside.keys() == standalone.keys() and all(torch.equal(inside[k], standalone[k]) for k in inside)
    manifest = json.loads((dest / "moeprep.json").read_text())
    assert [entry["path"] for entry in manifest["lora"]] == ["lora/my-adapter"]
    assert "lora/my-adapter/adapter_model.safetensors" in manifest["files"]
    assert run_cli("verify", dest).returncode == 0
    assert "LoRA adapters: lora/my-adapter" in " ".join(run_cli("inspect", dest).stdout.split())
    (dest / "lora" / "my-adapter" / "stray.txt").write_text("x")
    stray = run_cli("verify", dest)
    assert stray.returncode == 2 and "stray.txt" in stray.stderr
    (dest / "lora" / "my-adapter" / "stray.txt").unlink()
    weights = dest / "lora" / "my-adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    flipped = run_cli("verify", dest)
    assert flipped.returncode == 2 and "adapter_model.safetensors" in flipped.stderr


def test_a_split_that_would_replace_its_adapter_is_refused(tiny, tmp_path: Path) -> None:
    base = prepared(tiny, tmp_path, "qwen2-moe", "none")
    config = json.loads((base / "config.json").read_text())
    moe = get_family("qwen2-moe").moe_spec(config)
    h, i = config["hidden_size"], moe.expert_intermediate
    shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    per_expert_adapter(tmp_path / "adapter", shapes, moe.num_experts, layers=moe.moe_layers[:1])
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    result = run_cli(
        "lora", "split", tmp_path / "adapter", "--base", base, "--out", tmp_path / "adapter", "--overwrite"
    )
    assert result.returncode == 2 and "which this run reads" in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before


def test_convert_with_a_bad_lora_writes_nothing(tiny, tmp_path: Path) -> None:
    _, adapter = peft_adapter(tiny("qwen3-moe"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    result = run_cli("convert", tiny("gpt-oss"), tmp_path / "out", "--backend", "triton", "--lora", adapter)
    assert result.returncode == 2 and "trained for another base" in result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_already_split_adapter_is_not_split_again(tiny, tmp_path: Path) -> None:
    base = prepared(tiny, tmp_path, "qwen3-moe", "none")
    _, adapter = peft_adapter(tiny("qwen3-moe"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    split(adapter, base, tmp_path / "once")
    result = run_cli("lora", "split", tmp_path / "once", "--base", base, "--out", tmp_path / "twice")
    assert result.returncode == 2 and "already split" in result.stderr and not (tmp_path / "twice").exists()


def test_serve_hint_names_the_flags_vllm_needs(tiny, tmp_path: Path) -> None:
    base = prepared(tiny, tmp_path, "gpt-oss", "marlin")
    _, adapter = peft_adapter(tiny("gpt-oss"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    result = run_cli("lora", "split", adapter, "--base", base, "--out", tmp_path / "out")
    hint = " ".join(result.stdout.split())
    assert "--enable-lora" in hint and "--lora-target-modules experts q_proj" in hint
    assert "--moe-backend marlin" in hint and "note:" not in hint
    assert "--enable-mixed-moe-lora-format" not in hint  # vLLM's gpt-oss LoRA is 3-D: the split writes that layout
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"] == ["experts", "q_proj"]


@pytest.mark.parametrize("backend", ["triton", "none"])
def test_serve_hint_for_triton_bases_names_the_lora_capable_triton_kernel(tiny, tmp_path: Path, backend: str) -> None:
    base = prepared(tiny, tmp_path, "gpt-oss", backend)
    _, adapter = peft_adapter(tiny("gpt-oss"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    result = run_cli("lora", "split", adapter, "--base", base, "--out", tmp_path / "out")
    printed = " ".join(result.stdout.split())
    assert "--moe-backend triton_unfused" in printed and "note: vLLM 0.34's MoE LoRA fails" in printed


def test_gpt_oss_per_expert_adapter_becomes_vllm_3d_layout_exactly(tiny, tmp_path: Path) -> None:
    """Per-expert w1/w3/w2 adapters with their own A each: gate and up ranks are stacked into one gate_up
    LoRA (rank 2r), down zero-padded to that rank; every expert's updates are unchanged, bitwise in fp32."""
    base = prepared(tiny, tmp_path, "gpt-oss", "marlin")
    config = json.loads((base / "config.json").read_text())
    h, i, experts = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    shapes = {"w1": (i, h), "w3": (i, h), "w2": (h, i)}
    original = per_expert_adapter(tmp_path / "adapter", shapes, experts, layers=(0,))
    out = split(tmp_path / "adapter", base, tmp_path / "out")
    scaling = split_scaling(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 6  # 3 (gate) + 3 (up)
    assert sorted(out) == [f"{PREFIX}model.layers.0.mlp.experts.{m}weight" for m in WRITTEN_3D]
    out, original = ({k: v.float() for k, v in t.items()} for t in (out, original))
    for e in range(experts):
        gate, up, down = gate_up_down_deltas(out, "model.layers.0.mlp.experts", e, experts, scaling, ())
        for name, got in (("w1", gate), ("w3", up), ("w2", down)):
            want = expert_delta(original, f"model.layers.0.mlp.experts.{e}.{name}", 2.0)
            rows, cols = want.shape
            torch.testing.assert_close(got[:rows, :cols], want, rtol=1e-6, atol=1e-7)
            assert not got[rows:].any() and not got[:, cols:].any()


WRITTEN_3D = ("base_layer.lora_A.", "base_layer.lora_B.", "lora_A.", "lora_B.")


@pytest.fixture()
def adapter_check(monkeypatch: pytest.MonkeyPatch):
    """The plugin's wrapper around vLLM's adapter-config reader, removed again after the test."""
    pytest.importorskip("vllm")
    from vllm.lora.peft_helper import PEFTHelper

    from moeprep.runtime import lora_check

    original = PEFTHelper.__dict__["from_local_dir"]
    monkeypatch.setattr(lora_check, "_served_base", None)
    lora_check.install_adapter_check()
    lora_check.install_adapter_check()  # idempotent
    yield lora_check
    PEFTHelper.from_local_dir = original


def test_vllm_refuses_a_split_adapter_on_another_base(tiny, tmp_path: Path, adapter_check) -> None:
    """The plugin wraps vLLM's adapter-config reader: a split adapter loads only on the base it was split for."""
    from vllm.lora.peft_helper import PEFTHelper

    from moeprep.errors import PreparedCheckpointMismatch

    lora_check = adapter_check
    base = prepared(tiny, tmp_path, "qwen3-moe", "none")
    other = tmp_path / "other"
    assert run_cli("convert", tiny("qwen3-moe"), other, "--max-shard-size", "300KB").returncode == 0
    _, adapter = peft_adapter(tiny("qwen3-moe"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    split(adapter, base, tmp_path / "split")

    with pytest.raises(PreparedCheckpointMismatch, match="not serving one"):
        PEFTHelper.from_local_dir(str(tmp_path / "split"), max_position_embeddings=512)
    lora_check.serve_base(other)
    with pytest.raises(PreparedCheckpointMismatch, match="run moeprep lora split for this base"):
        PEFTHelper.from_local_dir(str(tmp_path / "split"), max_position_embeddings=512)
    lora_check.serve_base(base)
    assert PEFTHelper.from_local_dir(str(tmp_path / "split"), max_position_embeddings=512).r == 4
    assert PEFTHelper.from_local_dir(str(adapter), max_position_embeddings=512).r == 4  # not moeprep's: untouched


def test_vllm_takes_convert_lora_adapters_only_from_their_folder(tiny, tmp_path: Path, adapter_check) -> None:
    from vllm.lora.peft_helper import PEFTHelper

    from moeprep.errors import PreparedCheckpointMismatch

    lora_check = adapter_check
    _, adapter = peft_adapter(tiny("qwen3-moe"), tmp_path / "adapter", r=4, lora_alpha=8, **BY_PARAMETERS)
    dest = tmp_path / "with-lora"
    assert run_cli("convert", tiny("qwen3-moe"), dest, "--lora", adapter).returncode == 0
    inside = str(dest / "lora" / "adapter")
    lora_check.serve_base(dest)
    assert PEFTHelper.from_local_dir(inside, max_position_embeddings=512).r == 4
    lora_check.serve_base(prepared(tiny, tmp_path, "qwen3-moe", "none"))
    with pytest.raises(PreparedCheckpointMismatch, match="belongs to another prepared folder"):
        PEFTHelper.from_local_dir(inside, max_position_embeddings=512)
