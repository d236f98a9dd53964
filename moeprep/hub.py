"""Upload a prepared folder to the Hugging Face Hub, resumably and only after it verifies.

Each weight shard is its own commit and the manifest (with the configs and the model card) comes
in the last one, so an interrupted upload never leaves a repo that looks complete. Re-running
the same upload skips what is already there: ``huggingface_hub`` drops files whose remote oid
equals the local one from a commit, and the storage backend skips objects it already holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeprep.checkpoint.source import first_line, hub_errors
from moeprep.errors import HubError
from moeprep.schema.manifest import MANIFEST_NAME, SEAL_NAME, load_manifest
from moeprep.verify import verify_folder


@dataclass(frozen=True)
class UploadReport:
    repo_id: str
    revision: str
    commits: int  # commits created by this run (files already on the Hub make none)
    files: int


def upload_groups(folder: Path) -> list[list[str]]:
    """The commits of an upload, in order: one per weight shard, then everything else with the manifest."""
    manifest = load_manifest(folder)
    shards = sorted(name for name in manifest.files if name.endswith(".safetensors"))
    rest = sorted(name for name in manifest.files if name not in shards)
    return [[shard] for shard in shards] + [[*rest, MANIFEST_NAME, SEAL_NAME]]


def upload_prepared(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    on_commit: Callable[[list[str]], None] | None = None,
    commit_message: str | None = None,
) -> UploadReport:
    """Verify ``folder`` (refusing to upload one that fails), then upload it to ``repo_id`` (``token``: None for
    HF_TOKEN or the login's; ``commit_message``: what each commit says before the files it adds)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    verify_folder(folder)
    groups = upload_groups(folder)
    branch = revision or "main"
    api = HfApi(token=token)
    commits = 0
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the account's default
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch).sha
        for group in groups:
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in group]
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=f"{commit_message or 'moeprep: upload'} {', '.join(group)}",
                revision=branch,
            )
            if info.oid != head:  # an unchanged group creates no commit and returns the current head
                commits, head = commits + 1, info.oid
                if on_commit is not None:
                    on_commit(group)
    except hub_errors() as exc:
        raise HubError(
            f"upload of {folder} to {repo_id}@{branch} failed: {first_line(exc)}; check the repo id and your token "
            "(HF_TOKEN or `hf auth login`), then run the same command again to resume"
        ) from exc
    return UploadReport(repo_id, branch, commits, sum(len(g) for g in groups))
