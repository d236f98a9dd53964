"""A Hugging Face Hub-compatible HTTP server on loopback, for tests (no outside network here).

It speaks the parts of the Hub API that ``huggingface_hub`` uses to download and upload model repos:
repo info, recursive tree listing, ``resolve`` (HEAD/GET with ranges), repo and branch creation,
``preupload``, the git-LFS batch API with basic PUT transfers, and ndjson commits. Large files are
LFS objects (clients must set ``HF_HUB_DISABLE_XET=1``: the Xet CAS protocol is hf_xet's, not ours).
Every request is logged so tests can assert what was fetched or uploaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
REGULAR_LIMIT = 5 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


def is_lfs(path: str, size: int) -> bool:
    return size > REGULAR_LIMIT or any(fnmatch(path, p) for p in LFS_PATTERNS)


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    history: list[tuple[str, list[str]]] = field(default_factory=list)  # (commit sha, paths added), in order
    messages: dict[str, str] = field(default_factory=dict)  # commit sha -> its message (summary)

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


@dataclass
class HubState:
    token: str | None = None  # when set, private repos and writes need "Bearer <token>"
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    served: list[tuple[str, str, int]] = field(default_factory=list)  # resolve GETs: (file, Range header, bytes sent)
    lock: threading.Lock = field(default_factory=threading.Lock)
    commit_hook: Any = None  # called with (repo_id, paths) after each commit
    lfs_hook: Any = None  # called with the oid after each stored LFS object

    def add_commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str = "") -> str:
        """Commit ``files`` on top of ``branch`` (created from nothing if new); returns the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        parent = repo.branches.get(branch)
        tree = dict(repo.commits[parent]) if parent else {}
        tree.update(files)
        sha = hashlib.sha1(f"{repo_id}:{parent}:{message}:{len(repo.commits)}".encode()).hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        repo.history.append((sha, sorted(files)))
        repo.messages[sha] = message
        return sha

    def requests(self, method: str, pattern: str = "") -> list[str]:
        return [p for m, p in self.log if m == method and pattern in p]


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self.server.state

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, raw: bytes = b"") -> None:
        data = json.dumps(payload).encode() if payload is not None else raw
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def error(self, status: int, message: str, code: str = "") -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.reply(status, {"error": message}, headers)

    def authorized(self) -> bool:
        return self.state.token is None or self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or ((repo.private or write) and not self.authorized()):
            self.error(404 if repo is None or not self.authorized() else 403, "Repository not found", "RepoNotFound")
            return None
        return repo

    def route(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.state.lock:
            self.state.log.append((method, path))
        for verb, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                handler(self, query=query, **match.groupdict())
                return
        self.error(404, f"no route for {method} {path}")

    def do_GET(self) -> None:
        self.route("GET")

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_POST(self) -> None:
        self.route("POST")

    def do_PUT(self) -> None:
        self.route("PUT")

    # -- read API ----------------------------------------------------------------------------

    def commit_of(self, repo: str, revision: str) -> tuple[Repo, str] | None:
        """The readable repo and the commit ``revision`` names, or None after replying with the error."""
        found = self.repo(repo)
        if found is None:
            return None
        sha = found.resolve(revision)
        if sha is None:
            self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return found, sha

    def repo_info(self, repo: str, revision: str, query: dict) -> None:
        if (resolved := self.commit_of(repo, revision)) is None:
            return
        found, sha = resolved
        siblings = [{"rfilename": p} for p in sorted(found.commits[sha])]
        self.reply(200, {"id": repo, "sha": sha, "private": found.private, "siblings": siblings})

    def tree(self, repo: str, revision: str, query: dict) -> None:
        if (resolved := self.commit_of(repo, revision)) is None:
            return
        found, sha = resolved
        entries = []
        for path, data in sorted(found.commits[sha].items()):
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
            if is_lfs(path, len(data)):
                pointer = lfs_pointer(data)
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            else:
                entry["oid"] = git_blob_sha1(data)
            entries.append(entry)
        self.reply(200, entries)

    def resolve(self, repo: str, revision: str, file: str, query: dict) -> None:
        if (resolved := self.commit_of(repo, revision)) is None:
            return
        found, sha = resolved
        data = found.commits[sha].get(file)
        if data is None:
            self.error(404, f"{file} not found", "EntryNotFound")
            return
        etag = hashlib.sha256(data).hexdigest() if is_lfs(file, len(data)) else git_blob_sha1(data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        status, part = 200, data
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            stop = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
            status, part = 206, data[start:stop]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
        if self.command == "GET":
            with self.state.lock:
                self.state.served.append((file, self.headers.get("Range", ""), len(part)))
        self.reply(status, headers=headers, raw=part)

    # -- write API ---------------------------------------------------------------------------

    def create_repo(self, query: dict) -> None:
        if not self.authorized() or self.headers.get("Authorization") is None:
            self.error(401, "Invalid credentials in Authorization header")
            return
        payload = json.loads(self.body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.state.lock:
            if repo_id in self.state.repos:  # the Hub answers with the url too; clients rely on it
                message = "You already created this model repo"
                self.reply(
                    409, {"error": message, "url": f"{self.server.endpoint}/{repo_id}"}, {"X-Error-Message": message}
                )
                return
            repo = self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            sha = self.state.add_commit(repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, "init")
            assert repo.branches["main"] == sha
        self.reply(200, {"url": f"{self.server.endpoint}/{repo_id}", "name": repo_id})

    def create_branch(self, repo: str, branch: str, query: dict) -> None:
        found = self.repo(repo, write=True)
        if found is None:
            return
        self.body()
        with self.state.lock:
            if branch in found.branches:
                self.error(409, f"Reference already exists: refs/heads/{branch}")
                return
            found.branches[branch] = found.branches["main"]
        self.reply(200, {})

    def preupload(self, repo: str, revision: str, query: dict) -> None:
        found = self.repo(repo, write=True)
        if found is None:
            return
        files = json.loads(self.body())["files"]
        sha = found.resolve(revision)
        tree = found.commits.get(sha, {}) if sha else {}
        answer = []
        for f in files:
            lfs = is_lfs(f["path"], f["size"])
            remote = tree.get(f["path"])
            oid = None
            if remote is not None:
                oid = hashlib.sha256(remote).hexdigest() if lfs else git_blob_sha1(remote)
            answer.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self.reply(200, {"files": answer})

    def lfs_batch(self, repo: str, query: dict) -> None:
        if self.repo(repo, write=True) is None:
            return
        request = json.loads(self.body())
        objects = []
        for obj in request["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:  # already stored objects get no upload action
                answer["actions"] = {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(answer)
        self.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str, query: dict) -> None:
        data = self.body()
        if hashlib.sha256(data).hexdigest() != oid:
            self.error(400, "sha256 of the uploaded object does not match its oid")
            return
        with self.state.lock:
            self.state.lfs[oid] = data
        if self.state.lfs_hook is not None:
            self.state.lfs_hook(oid)
        self.reply(200, {})

    def commit(self, repo: str, revision: str, query: dict) -> None:
        found = self.repo(repo, write=True)
        if found is None:
            return
        if revision not in found.branches:
            self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return
        files: dict[str, bytes] = {}
        header: dict[str, Any] = {}
        for line in self.body().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                data = self.state.lfs.get(value["oid"])
                if data is None:
                    self.error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    return
                files[value["path"]] = data
            else:
                self.error(400, f"unsupported commit operation {item['key']}")
                return
        with self.state.lock:
            sha = self.state.add_commit(repo, revision, files, header.get("summary", ""))
        self.reply(200, {"commitUrl": f"{self.server.endpoint}/{repo}/commit/{sha}", "commitOid": sha})
        if self.state.commit_hook is not None:
            self.state.commit_hook(repo, sorted(files))

    def validate_yaml(self, query: dict) -> None:
        """The model card's YAML front matter must parse to a mapping (what the Hub checks first)."""
        import yaml

        content = json.loads(self.body())["content"]
        front = content.split("---\n")[1] if content.startswith("---\n") else ""
        try:
            metadata = yaml.safe_load(front)
        except yaml.YAMLError as exc:
            self.reply(400, {"errors": [{"message": str(exc)}]})
            return
        if not isinstance(metadata, dict):
            self.reply(400, {"errors": [{"message": "README.md has no YAML metadata block"}]})
            return
        self.reply(200, {"warnings": []})


ROUTES = [
    ("GET", rf"/api/models/{REPO}/revision/(?P<revision>.+)", HubHandler.repo_info),
    ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)/?", HubHandler.tree),
    ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)", HubHandler.resolve),
    ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)", HubHandler.resolve),
    ("POST", r"/api/repos/create", HubHandler.create_repo),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", HubHandler.create_branch),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>.+)", HubHandler.preupload),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", HubHandler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", HubHandler.lfs_put),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>.+)", HubHandler.commit),
    ("POST", r"/api/validate-yaml", HubHandler.validate_yaml),
]


class HubServer(ThreadingHTTPServer):
    """``with HubServer() as hub:`` serve ``hub.state`` on ``hub.endpoint`` in a background thread."""

    daemon_threads = True

    def __init__(self, token: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState(token=token)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
