"""Hub download and upload against a Hub-compatible server on loopback (tests/hub_server.py).

Download: every file but other copies of the weights, pinned revisions, HF_HUB_OFFLINE, tokens. Upload:
multi-shard folders, resume after an interrupted upload, refusal of folders that fail verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeprep.fixtures import build_fixture
from moeprep.schema.manifest import MANIFEST_NAME, load_manifest
from tests.hub_server import HubServer, git_blob_sha1

TOKEN = "hf_loopback_secret"
REPO = "org/tiny-qwen2-moe"
# other copies of the weights: never downloaded; other files: downloaded and carried
EXTRA_FILES = {"original/consolidated.safetensors": b"x" * 4096, "pytorch_model.bin": b"y" * 2048, "photo.png": b"z"}
CARRIED_EXTRA = {"photo.png"}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def moeprep(hub: HubServer, home: Path, *args: str | Path, token: str | None = TOKEN, **env: str):
    """Run the moeprep CLI against ``hub`` with its own Hugging Face cache in ``home``."""
    environ = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        **env,
    }
    environ.pop("HF_TOKEN", None)
    if token:
        environ["HF_TOKEN"] = token
    command = [sys.executable, "-m", "moeprep", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environ)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def two_revisions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hub-src")
    return build_fixture("qwen2-moe", root / "v1", seed=1), build_fixture("qwen2-moe", root / "v2", seed=2)


@pytest.fixture()
def hub(two_revisions: tuple[Path, Path]):
    """A server holding REPO (private) with two commits: the seed-1 fixture, then the seed-2 one."""
    v1, v2 = two_revisions
    with HubServer(token=TOKEN) as server:
        first = server.state.add_commit(REPO, "main", {**folder_files(v1), **EXTRA_FILES}, "v1")
        server.state.add_commit(REPO, "main", folder_files(v2), "v2")
        server.state.repos[REPO].private = True
        server.state.first_commit = first  # type: ignore[attr-defined]
        yield server


def test_convert_from_repo_downloads_only_needed_files_at_the_pinned_revision(
    hub: HubServer, two_revisions: tuple[Path, Path], tmp_path: Path
) -> None:
    first = hub.state.first_commit  # type: ignore[attr-defined]
    result = moeprep(hub, tmp_path / "home", "convert", REPO, tmp_path / "out", "--revision", first)
    assert result.returncode == 0, result.stderr
    fetched = {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in hub.state.requests("GET", "/resolve/")}
    assert fetched == set(folder_files(two_revisions[0])) | CARRIED_EXTRA, fetched
    assert (tmp_path / "out" / "photo.png").read_bytes() == EXTRA_FILES["photo.png"]
    manifest = load_manifest(tmp_path / "out")
    assert (manifest.source.kind, manifest.source.location, manifest.source.revision) == ("hub", REPO, first)
    for name, data in folder_files(two_revisions[0]).items():  # the seed-1 files, not the newer ones
        assert manifest.source.files[name].size == len(data), name
    local = moeprep(hub, tmp_path / "home", "convert", two_revisions[0], tmp_path / "local")
    assert local.returncode == 0, local.stderr
    assert {n: r.sha256_tree for n, r in load_manifest(tmp_path / "local").tensors.items()} == {
        n: r.sha256_tree for n, r in manifest.tensors.items()
    }
    card = (tmp_path / "out" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["base_model"] == REPO and metadata["base_model_relation"] == "quantized"


def test_convert_lists_the_repo_once_and_touches_only_what_it_fetches(hub: HubServer, tmp_path: Path) -> None:
    """The headers pass and the download share one listing: the repo is listed once (its info at the
    revision) plus once by the download at the pinned commit, and no request touches a file left out."""
    result = moeprep(hub, tmp_path / "home", "convert", REPO, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert len(hub.state.requests("GET", f"/api/models/{REPO}/revision/")) == 1
    assert len(hub.state.requests("GET", f"/api/models/{REPO}/tree/")) <= 1
    touched = {
        p.split("/resolve/", 1)[1].split("/", 1)[1] for m in ("HEAD", "GET") for p in hub.state.requests(m, "/resolve/")
    }
    assert not touched & {"pytorch_model.bin", "original/consolidated.safetensors"}, touched


def test_branch_revision_records_the_commit_it_resolved_to(hub: HubServer, tmp_path: Path) -> None:
    result = moeprep(hub, tmp_path / "home", "convert", REPO, tmp_path / "out", "--revision", "main")
    assert result.returncode == 0, result.stderr
    assert load_manifest(tmp_path / "out").source.revision == hub.state.repos[REPO].branches["main"]


def test_dry_run_reads_shard_headers_and_downloads_no_shard(
    hub: HubServer, two_revisions: tuple[Path, Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    result = moeprep(hub, home, "convert", REPO, tmp_path / "out", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    local = moeprep(hub, home, "convert", two_revisions[1], tmp_path / "out", "--dry-run", "--json")
    assert plan == json.loads(local.stdout)  # the same plan as from the downloaded folder
    assert not list(home.rglob("*.safetensors")) and not (tmp_path / "out").exists()
    shards = [request for request in hub.state.served if request[0].endswith(".safetensors")]
    assert {file for file, _, _ in shards} == plan_shards(two_revisions[1])  # every shard's header was read...
    assert all(ranged.startswith("bytes=0-") for _, ranged, _ in shards), shards  # ...by a ranged read of its start
    assert sum(sent for *_, sent in shards) < sum(p.stat().st_size for p in two_revisions[1].glob("*.safetensors"))


def plan_shards(folder: Path) -> set[str]:
    return set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())


def test_options_that_do_not_fit_the_model_fail_before_any_shard_is_downloaded(hub: HubServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = moeprep(hub, home, "convert", REPO, tmp_path / "out", "--backend", "triton")
    assert_one_line_error(result, "backend triton lays out mxfp4 experts")
    assert not list(home.rglob("*.safetensors")) and not (tmp_path / "out").exists()


def test_offline_uses_the_cache_and_fails_cleanly_without_it(hub: HubServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert moeprep(hub, home, "convert", REPO, tmp_path / "online").returncode == 0
    before = len(hub.state.log)
    offline = moeprep(hub, home, "convert", REPO, tmp_path / "offline", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert len(hub.state.log) == before  # nothing was asked of the server
    assert folder_files(tmp_path / "offline")["model.safetensors.index.json"]
    empty = moeprep(hub, tmp_path / "empty-home", "convert", REPO, tmp_path / "none", HF_HUB_OFFLINE="1")
    assert_one_line_error(empty, REPO, "HF_HUB_OFFLINE")
    assert not (tmp_path / "none").exists()


def test_token_comes_from_the_environment(hub: HubServer, tmp_path: Path) -> None:
    denied = moeprep(hub, tmp_path / "home", "convert", REPO, tmp_path / "out", token=None)
    assert_one_line_error(denied, REPO)
    assert not (tmp_path / "out").exists()
    wrong = moeprep(hub, tmp_path / "home", "convert", REPO, tmp_path / "out", token="hf_wrong")
    assert_one_line_error(wrong, REPO)
    assert moeprep(hub, tmp_path / "home", "convert", REPO, tmp_path / "out").returncode == 0


def test_a_prepared_repo_is_not_converted_again(hub: HubServer, tmp_path: Path, two_revisions) -> None:
    prepared = tmp_path / "prepared"
    assert moeprep(hub, tmp_path / "home", "convert", two_revisions[0], prepared).returncode == 0
    result = moeprep(hub, tmp_path / "home", "convert", prepared, tmp_path / "again")
    assert_one_line_error(result, "already prepared by moeprep")


# -- upload ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(two_revisions: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("hub-prepared") / "prepared"
    with HubServer() as server:
        home = tmp_path_factory.mktemp("home")
        result = moeprep(server, home, "convert", two_revisions[0], dest, "--max-shard-size", "300KB")
    assert result.returncode == 0, result.stderr
    assert len(list(dest.glob("model-*.safetensors"))) >= 4
    return dest


def remote_files(hub: HubServer, repo: str, branch: str = "main") -> dict[str, bytes]:
    state = hub.state.repos[repo]
    files = dict(state.commits[state.branches[branch]])
    files.pop(".gitattributes")
    return files


def test_upload_multi_shard_folder_in_one_commit(prepared: Path, tmp_path: Path) -> None:
    with HubServer(token=TOKEN) as hub:
        result = moeprep(hub, tmp_path / "home", "upload", "org/prepared", prepared, "--private")
        assert result.returncode == 0, result.stderr
        assert remote_files(hub, "org/prepared") == folder_files(prepared)
        repo = hub.state.repos["org/prepared"]
        assert repo.private
        commits = [paths for _, paths in repo.history[1:]]
        assert len(commits) == 1 and MANIFEST_NAME in commits[0]  # the folder appears all at once
        shards = sorted(p.name for p in prepared.glob("model-*.safetensors"))
        assert len(hub.state.requests("PUT", "/lfs-upload/")) == len(shards)  # shards went through LFS
        assert [line.split()[-1] for line in result.stderr.splitlines() if line.startswith("stored ")] == shards
        again = moeprep(hub, tmp_path / "home", "upload", "org/prepared", prepared)
        assert again.returncode == 0, again.stderr
        assert len(repo.history) == 2 and "no new commit" in " ".join(again.stdout.split())
        assert len(hub.state.requests("PUT", "/lfs-upload/")) == len(shards)


def test_upload_to_a_branch(prepared: Path, tmp_path: Path) -> None:
    with HubServer(token=TOKEN) as hub:
        result = moeprep(hub, tmp_path / "home", "upload", "org/prepared", prepared, "--revision", "vllm-0.26")
        assert result.returncode == 0, result.stderr
        assert remote_files(hub, "org/prepared", "vllm-0.26") == folder_files(prepared)
        assert remote_files(hub, "org/prepared", "main") == {}


def test_upload_with_a_token_option_and_commit_message(prepared: Path, tmp_path: Path) -> None:
    with HubServer(token=TOKEN) as hub:
        denied = moeprep(hub, tmp_path / "home", "upload", "org/prepared", prepared, token=None)
        assert_one_line_error(denied, "org/prepared")
        args = ("upload", "org/prepared", prepared, "--token", TOKEN, "--commit-message", "gpt-oss for H200")
        result = moeprep(hub, tmp_path / "home", *args, token=None)
        assert result.returncode == 0, result.stderr
        assert remote_files(hub, "org/prepared", "main") == folder_files(prepared)
        repo = hub.state.repos["org/prepared"]
        messages = [repo.messages[sha] for sha, paths in repo.history if MANIFEST_NAME in paths]
        assert messages == ["gpt-oss for H200"]


def test_interrupted_upload_shows_nothing_and_resumes_without_sending_stored_shards_again(
    prepared: Path, tmp_path: Path
) -> None:
    shards = sorted(p.name for p in prepared.glob("model-*.safetensors"))
    oids = {hashlib.sha256((prepared / s).read_bytes()).hexdigest(): s for s in shards}
    with HubServer(token=TOKEN) as hub:
        environ = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": TOKEN,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "moeprep", "upload", "org/prepared", str(prepared)],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def kill_after_second_shard(oid: str) -> None:
            if oids.get(oid) == shards[1]:
                process.send_signal(signal.SIGKILL)

        hub.state.lfs_hook = kill_after_second_shard
        assert process.wait(timeout=120) == -signal.SIGKILL
        hub.state.lfs_hook = None
        assert remote_files(hub, "org/prepared") == {}  # nothing committed: the repo never looks complete
        stored = set(hub.state.lfs)
        assert {oid for oid, shard in oids.items() if shard in shards[:2]} <= stored
        first_puts = len(hub.state.requests("PUT", "/lfs-upload/"))
        result = moeprep(hub, tmp_path / "home", "upload", "org/prepared", prepared)
        assert result.returncode == 0, result.stderr
        assert remote_files(hub, "org/prepared") == folder_files(prepared)
        resent = {p.rsplit("/", 1)[1] for p in hub.state.requests("PUT", "/lfs-upload/")[first_puts:]}
        assert resent == set(oids) - stored and len(resent) == len(shards) - len(stored & set(oids))
        assert len(hub.state.repos["org/prepared"].history) == 2  # the repo's creation, then the one upload


def test_upload_refuses_a_folder_that_fails_verify(prepared: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name, data in folder_files(prepared).items():
        (tampered / name).write_bytes(data)
    shard = sorted(tampered.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10
    shard.write_bytes(bytes(data))
    with HubServer(token=TOKEN) as hub:
        result = moeprep(hub, tmp_path / "home", "upload", "org/prepared", tampered)
        assert_one_line_error(result, shard.name)
        assert hub.state.repos == {} and not hub.state.requests("POST")


def test_convert_with_upload_repo(two_revisions: tuple[Path, Path], tmp_path: Path) -> None:
    with HubServer(token=TOKEN) as hub:
        dest = tmp_path / "out"
        result = moeprep(hub, tmp_path / "home", "convert", two_revisions[0], dest, "--upload-repo", "org/up")
        assert result.returncode == 0, result.stderr
        assert remote_files(hub, "org/up") == folder_files(dest)
        assert "vllm serve org/up" in (dest / "README.md").read_text()
        uploaded_card = remote_files(hub, "org/up")["README.md"]
        assert git_blob_sha1(uploaded_card) == git_blob_sha1((dest / "README.md").read_bytes())


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--dry-run", "--upload-repo", "org/x"), "--upload-repo"),
        (("--private",), "--private"),
        (("--upload-revision", "b"), "--upload-revision"),
    ],
    ids=["dry-run+upload", "private-without-repo", "upload-revision-without-repo"],
)
def test_conflicting_upload_options_are_refused(
    args: tuple[str, ...], flag: str, two_revisions: tuple[Path, Path], tmp_path: Path
) -> None:
    with HubServer(token=TOKEN) as hub:
        result = moeprep(hub, tmp_path / "home", "convert", two_revisions[0], tmp_path / "out", *args)
        # a usage error, as click reports them: the usage line and "Error: Invalid value for '--flag': why"
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"Error: Invalid value for '{flag}'" in result.stderr
        assert not (tmp_path / "out").exists() and not hub.state.log


def test_model_card_metadata(prepared: Path) -> None:
    card = (prepared / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "vllm"
    assert {"moeprep", "backend-none", "qwen2_moe"} <= set(metadata["tags"])
    assert "vllm serve" in card and "moeprep verify" in card
    manifest = json.loads((prepared / MANIFEST_NAME).read_text())
    assert manifest["files"]["README.md"]["size"] == len(card.encode())


def test_unreachable_hub_is_one_line(prepared: Path, tmp_path: Path) -> None:
    with HubServer(token=TOKEN) as hub:
        endpoint = hub.endpoint  # nothing listens there once the server is closed
    closed = type("Closed", (), {"endpoint": endpoint})()
    result = moeprep(closed, tmp_path / "home", "upload", "org/prepared", prepared)
    assert_one_line_error(result, "org/prepared", "run the same command again")


def test_upload_keeps_lora_subfolders(two_revisions: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder converted with --lora uploads its lora/<name>/ files under the same paths."""
    from tests.test_lora import per_expert_adapter

    config = json.loads((two_revisions[0] / "config.json").read_text())
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    adapter = tmp_path / "my-adapter"
    per_expert_adapter(adapter, {"down_proj": (h, i)}, config["num_experts"])
    dest = tmp_path / "prepared"
    with HubServer(token=TOKEN) as hub:
        result = moeprep(
            hub, tmp_path / "home", "convert", two_revisions[0], dest, "--lora", adapter, "--upload-repo", "org/lora"
        )
        assert result.returncode == 0, result.stderr
        local = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
        assert "lora/my-adapter/adapter_model.safetensors" in local
        assert remote_files(hub, "org/lora") == local
