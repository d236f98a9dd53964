"""Upload a prepared folder to the Hugging Face Hub, resumably and only after it verifies.

The weight shards are uploaded to the repo's storage one by one (``preupload_lfs_files``), then every file goes
into one commit (``create_commit``): until that commit the repo shows none of the folder, so an interrupted
upload never looks complete. Re-running the same upload sends only what the storage does not hold yet, and an
upload of an unchanged folder makes no commit.
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
    committed: bool  # False: the Hub already held this folder at that revision
    files: int


def upload_order(folder: Path) -> list[str]:
    """The folder's files in upload order: the weight shards, then everything else, the manifest and seal last."""
    manifest = load_manifest(folder)
    shards = sorted(name for name in manifest.files if name.endswith(".safetensors"))
    rest = sorted(name for name in manifest.files if name not in shards)
    return [*shards, *rest, MANIFEST_NAME, SEAL_NAME]


def upload_prepared(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    on_stored: Callable[[str], None] | None = None,
    commit_message: str | None = None,
) -> UploadReport:
    """Verify ``folder`` (refusing to upload one that fails), then upload it to ``repo_id`` in one commit
    (``token``: None for HF_TOKEN or the login's; ``on_stored``: called with each shard once the Hub's storage
    holds it; ``commit_message``: the commit's title)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    verify_folder(folder)
    names = upload_order(folder)
    branch = revision or "main"
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private or None, exist_ok=True)  # None: the account's default
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.repo_info(repo_id, revision=branch).sha
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=folder / name) for name in names]
        for operation in operations:
            if operation.path_in_repo.endswith(".safetensors"):
                api.preupload_lfs_files(repo_id, [operation], revision=branch)
                if on_stored is not None:
                    on_stored(operation.path_in_repo)
        title = commit_message or f"moeprep: upload {folder.name}"
        info = api.create_commit(repo_id, operations, commit_message=title, revision=branch)
    except hub_errors() as exc:
        raise HubError(
            f"upload of {folder} to {repo_id}@{branch} failed: {first_line(exc)}; check the repo id and your token "
            "(HF_TOKEN or `hf auth login`), then run the same command again to resume"
        ) from exc
    return UploadReport(repo_id, branch, info.oid != head, len(names))  # no change: the head is returned
