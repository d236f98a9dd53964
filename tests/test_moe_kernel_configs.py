"""A fused layer's MoE kernel takes the tile configs vLLM tuned for the original expert count."""

import json
from pathlib import Path

import pytest
from torch import nn
from vllm.model_executor.layers.fused_moe import fused_moe as kernels

from moeprep.runtime.errors import PreparedCheckpointMismatch
from moeprep.runtime.fused_shared import SlotContract, take_routed_experts_configs
from moeprep.runtime.moe_kernel_configs import ROUTED_EXPERTS_OF, use_routed_experts_configs

N, K, TOP_K = 64, 32, 9


def tuned(folder: Path, experts: int, block_m: int) -> dict[str, int]:
    """Write vLLM's tuned-config file for ``experts`` (every batch size: one config, tagged by BLOCK_SIZE_M)."""
    config = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    configs = {str(m): config for m in (1, 16, 64)}
    (folder / kernels.get_config_file_name(experts, N, None)).write_text(json.dumps(configs))
    return config


def chosen(experts: int, tokens: int = 8) -> dict[str, int]:
    return kernels.try_get_optimal_moe_config((experts, 2 * N, K), (experts, K, N), TOP_K, None, tokens)


@pytest.fixture
def config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    return tmp_path


# Expert counts are unique per test: vLLM caches each count's lookup for the process.
def test_a_fused_count_takes_the_original_counts_tuned_config(config_folder: Path) -> None:
    original = tuned(config_folder, 1000, block_m=32)
    use_routed_experts_configs(1001, 1000)
    assert chosen(1001) == original
    assert chosen(1002) == kernels.get_default_config(8, 1002, N, K, TOP_K, None, None)


def test_the_original_counts_config_wins_over_one_tuned_for_the_fused_count(config_folder: Path) -> None:
    original = tuned(config_folder, 1010, block_m=32)
    tuned(config_folder, 1011, block_m=128)
    use_routed_experts_configs(1011, 1010)
    assert chosen(1011) == original


def test_without_an_original_config_the_fused_counts_own_lookup_runs(config_folder: Path) -> None:
    own = tuned(config_folder, 1021, block_m=128)
    use_routed_experts_configs(1021, 1020)
    assert chosen(1021) == own
    use_routed_experts_configs(1023, 1022)
    assert chosen(1023) == kernels.get_default_config(8, 1023, N, K, TOP_K, None, None)


def test_the_lookup_is_installed_once(config_folder: Path) -> None:
    use_routed_experts_configs(1031, 1030)
    installed = kernels.get_moe_configs
    use_routed_experts_configs(1033, 1032)
    assert kernels.get_moe_configs is installed
    assert not hasattr(installed.moeprep_routed_lookup, "moeprep_routed_lookup")


class Layer(nn.Module):
    def __init__(self, local_num_experts: int | None) -> None:
        super().__init__()
        if local_num_experts is not None:
            self.local_num_experts = local_num_experts


def contract(routed: int, replicas: int) -> SlotContract:
    slot_ids = (tuple(range(routed, routed + replicas)),)
    return SlotContract(routed, 1, replicas, 8, 64, False, 2.5, True, slot_ids=slot_ids)


@pytest.mark.parametrize(
    ("routed", "replicas", "local", "local_routed"),
    [(1040, 1, 1041, 1040), (1048, 8, 132, 131)],  # one device; expert parallelism over 8 ranks
)
def test_a_fused_layer_maps_its_local_count_to_the_original_share(
    routed: int, replicas: int, local: int, local_routed: int
) -> None:
    take_routed_experts_configs(Layer(local), contract(routed, replicas))
    assert ROUTED_EXPERTS_OF[local] == local_routed


def test_a_layer_without_a_local_expert_count_is_refused() -> None:
    with pytest.raises(PreparedCheckpointMismatch, match="local_num_experts"):
        take_routed_experts_configs(Layer(None), contract(1050, 1))
