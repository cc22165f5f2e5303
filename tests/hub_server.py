"""A tiny Hugging Face Hub-compatible HTTP server for tests (standard library only).

The real Hub cannot be reached from the test machines, yet the push/pull path of the library
(``create_repo``, ``upload_folder``, ``push_to_hub``, ``hf_hub_download``, ``snapshot_download``,
``from_pretrained("user/repo")``) must be tested for real, over HTTP. This server implements the
subset of the Hub API those calls use. Every file is answered as a ``"regular"`` (inline, base64)
upload, so no LFS/Xet transfer is involved.

Storage (under ``storage_dir``), per repo ``{type}s/{namespace}/{name}/``:
``refs.json`` (branch -> commit sha), ``commits/{sha}.json`` (parent, message, path -> blob id)
and ``blobs/{git-sha1}`` (file contents, addressed like git blobs, which is also the ETag).

``HF_ENDPOINT`` is read when ``huggingface_hub`` is imported, so clients must run in a fresh
subprocess with :meth:`HubServer.env` (or :meth:`HubServer.run_python`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
USER = "user"


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, ``X-Error-Code``, JSON body)."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.extra = extra  # more fields of the JSON body


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data``: the Hub's ETag and ``oid`` for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class RepoStore:
    """Repos on disk: content-addressed blobs plus one JSON manifest per commit."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()  # one writer at a time; commits are tiny

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "refs.json").is_file()

    def _refs(self, repo: Path) -> dict[str, str]:
        return json.loads((repo / "refs.json").read_text())

    def _write_refs(self, repo: Path, refs: dict[str, str]) -> None:
        (repo / "refs.json").write_text(json.dumps(refs))

    def create(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self.exists(repo_type, repo_id):
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = self.repo_dir(repo_type, repo_id)
            (repo / "commits").mkdir(parents=True, exist_ok=True)
            (repo / "blobs").mkdir(exist_ok=True)
            self._write_refs(repo, {})
            sha = self._write_commit(repo, parent=None, message="initial commit", files={})
            self._write_refs(repo, {"main": sha})

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self._check_repo(repo_type, repo_id)
            shutil.rmtree(self.repo_dir(repo_type, repo_id))

    def _check_repo(self, repo_type: str, repo_id: str) -> Path:
        if not self.exists(repo_type, repo_id):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repo_dir(repo_type, repo_id)

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """Branch name or commit sha -> commit sha."""
        repo = self._check_repo(repo_type, repo_id)
        refs = self._refs(repo)
        if revision in refs:
            return refs[revision]
        if len(revision) == 40 and (repo / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit_data(self, repo_type: str, repo_id: str, sha: str) -> dict[str, Any]:
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_text())

    def files(self, repo_type: str, repo_id: str, sha: str) -> dict[str, str]:
        """Path -> blob id at commit ``sha``."""
        return self.commit_data(repo_type, repo_id, sha)["files"]

    def blob(self, repo_type: str, repo_id: str, blob_id: str) -> bytes:
        return (self.repo_dir(repo_type, repo_id) / "blobs" / blob_id).read_bytes()

    def blob_size(self, repo_type: str, repo_id: str, blob_id: str) -> int:
        return (self.repo_dir(repo_type, repo_id) / "blobs" / blob_id).stat().st_size

    def _write_commit(self, repo: Path, parent: str | None, message: str, files: dict[str, str]) -> str:
        record = {"parent": parent, "message": message, "files": files, "date": _now()}
        salt = os.urandom(8).hex()  # two identical commits still get distinct ids
        sha = hashlib.sha1((json.dumps(record, sort_keys=True) + salt).encode()).hexdigest()
        (repo / "commits" / f"{sha}.json").write_text(json.dumps(record))
        return sha

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        message: str,
        adds: dict[str, bytes],
        deletes: list[tuple[str, bool]],
        parent_commit: str | None = None,
    ) -> str:
        """Apply deletions then additions on top of ``branch``; return the new commit sha."""
        with self.lock:
            repo = self._check_repo(repo_type, repo_id)
            refs = self._refs(repo)
            if branch not in refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = refs[branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"Parent commit {parent_commit} is not the head of {branch} ({head})")
            files = dict(self.files(repo_type, repo_id, head))
            for path, is_folder in deletes:
                prefix = path.rstrip("/") + "/"
                doomed = [p for p in files if (p.startswith(prefix) if is_folder else p == path)]
                if not doomed:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            for path, data in adds.items():
                blob_id = git_blob_sha1(data)
                (repo / "blobs" / blob_id).write_bytes(data)
                files[path] = blob_id
            sha = self._write_commit(repo, parent=head, message=message, files=files)
            refs[branch] = sha
            self._write_refs(repo, refs)
            return sha

    def create_branch(self, repo_type: str, repo_id: str, branch: str, start: str | None) -> None:
        with self.lock:
            repo = self._check_repo(repo_type, repo_id)
            refs = self._refs(repo)
            if branch in refs:
                raise HubError(409, f"Reference already exists: {branch}")
            refs[branch] = self.resolve(repo_type, repo_id, start or "main")
            self._write_refs(repo, refs)


class _Handler(BaseHTTPRequestHandler):
    """Routes Hub API requests to the :class:`RepoStore` of the server."""

    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects: every reply has a Content-Length
    server: _HubHTTPServer

    # -- plumbing -------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # quiet; requests go to server.log
        pass

    def _read_body(self) -> bytes:
        """Read the whole body first, or the next request on this keep-alive connection breaks."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _handle(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        self.server.log.append((self.command, unquote(url.path)))
        try:
            self._route(url.path, parse_qs(url.query), body)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            self._send(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)
        except Exception as err:  # report server bugs to the client instead of hanging it
            self._send(500, json.dumps({"error": f"test hub server error: {err!r}"}).encode())

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    # -- routing --------------------------------------------------------------------------------
    def _route(self, raw_path: str, query: dict[str, list[str]], body: bytes) -> None:
        seg = raw_path.strip("/").split("/")  # still percent-encoded: revisions may contain %2F
        method = self.command
        if seg[0] == "api":
            return self._route_api(method, seg[1:], query, body)
        if seg[0] in ("datasets", "spaces") and len(seg) > 4 and seg[3] == "resolve":
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        else:
            repo_type = "model"
        if len(seg) > 3 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
            return self._resolve(repo_type, repo_id, unquote(seg[3]), unquote("/".join(seg[4:])))
        raise HubError(404, f"Not found: {raw_path}")

    def _route_api(self, method: str, seg: list[str], query: dict[str, list[str]], body: bytes) -> None:
        store = self.server.store
        if seg == ["whoami-v2"] and method == "GET":
            return self._json(
                {
                    "type": "user",
                    "id": "0" * 24,
                    "name": USER,
                    "fullname": "Test User",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "dummy", "role": "write"}},
                }
            )
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}").get("content", ""))
        if seg[:1] == ["repos"] and method in ("POST", "DELETE"):
            payload = json.loads(body or b"{}")
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            if seg == ["repos", "create"]:
                url = self._repo_url(repo_type, repo_id)
                try:
                    store.create(repo_type, repo_id)
                except HubError as err:
                    err.extra["url"] = url  # create_repo(exist_ok=True) reads it from the 409 body
                    raise
                return self._json({"url": url, "name": repo_id, "id": repo_id})
            if seg == ["repos", "delete"]:
                store.delete(repo_type, repo_id)
                return self._send(200, b"")
        if len(seg) < 3 or seg[0] not in REPO_TYPES:
            raise HubError(404, f"Not found: /api/{'/'.join(seg)}")
        repo_type, repo_id = REPO_TYPES[seg[0]], f"{unquote(seg[1])}/{unquote(seg[2])}"
        action, rest = (seg[3], [unquote(s) for s in seg[4:]]) if len(seg) > 3 else ("", [])
        if method == "GET" and action in ("", "revision"):
            sha = store.resolve(repo_type, repo_id, rest[0] if rest else "main")
            return self._json(self._repo_info(repo_type, repo_id, sha, blobs="blobs" in query))
        if method == "GET" and action == "tree" and rest:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._json(self._tree(repo_type, repo_id, rest[0], "/".join(rest[1:]), recursive))
        if method == "POST" and action == "paths-info" and rest:
            sha = store.resolve(repo_type, repo_id, rest[0])
            paths = parse_qs(body.decode()).get("paths", [])
            return self._json([e for e in self._entries(repo_type, repo_id, sha) if e["path"] in paths])
        if method == "POST" and action == "preupload" and rest:
            return self._preupload(repo_type, repo_id, rest[0], json.loads(body))
        if method == "POST" and action == "commit" and rest:
            if query.get("create_pr", ["0"])[0] == "1":
                raise HubError(400, "create_pr is not supported by the test hub server")
            return self._commit(repo_type, repo_id, rest[0], body)
        if method == "POST" and action == "branch" and rest:
            start = json.loads(body or b"{}").get("startingPoint")
            store.create_branch(repo_type, repo_id, rest[0], start)
            return self._json({})
        raise HubError(404, f"Not found: {method} /api/{'/'.join(seg)}")

    # -- endpoints ------------------------------------------------------------------------------
    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.server.endpoint}/{prefix}{repo_id}"

    def _repo_info(self, repo_type: str, repo_id: str, sha: str, blobs: bool) -> dict[str, Any]:
        store = self.server.store
        data = store.commit_data(repo_type, repo_id, sha)
        siblings = []
        for path, blob_id in sorted(data["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=store.blob_size(repo_type, repo_id, blob_id), blobId=blob_id)
            siblings.append(sibling)
        return {
            "_id": sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": data["date"],
            "createdAt": data["date"],
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def _entries(self, repo_type: str, repo_id: str, sha: str) -> Iterator[dict[str, Any]]:
        """Every file and folder at commit ``sha``, as tree / paths-info entries."""
        store = self.server.store
        folders: set[str] = set()
        for path, blob_id in sorted(store.files(repo_type, repo_id, sha).items()):
            size = store.blob_size(repo_type, repo_id, blob_id)
            yield {"type": "file", "oid": blob_id, "size": size, "path": path}
            parts = path.split("/")[:-1]
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for folder in sorted(folders):
            oid = hashlib.sha1(f"{sha}:{folder}".encode()).hexdigest()
            yield {"type": "directory", "oid": oid, "size": 0, "path": folder}

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict]:
        sha = self.server.store.resolve(repo_type, repo_id, revision)
        entries = list(self._entries(repo_type, repo_id, sha))
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(e["path"] == prefix[:-1] and e["type"] == "directory" for e in entries):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
        below = [e for e in entries if e["path"].startswith(prefix)]
        if recursive:
            return below
        return [e for e in below if "/" not in e["path"][len(prefix) :]]

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        sha = store.resolve(repo_type, repo_id, revision)
        blob_id = store.files(repo_type, repo_id, sha).get(path)
        if blob_id is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=sha)
        data = store.blob(repo_type, repo_id, blob_id)
        status, first = 200, 0
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes=") and self.command == "GET":  # resumed downloads
            start, _, end = range_header[6:].partition("-")
            first = int(start or 0)
            data = data[first : int(end) + 1 if end else None]
            status = 206
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
            "ETag": f'"{blob_id}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        if status == 206:
            total = store.blob_size(repo_type, repo_id, blob_id)
            headers["Content-Range"] = f"bytes {first}-{first + len(data) - 1}/{total}"
        self._send(status, data, headers)

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
        """Every file is 'regular': its content comes inline in the commit, no LFS/Xet upload."""
        store = self.server.store
        sha = store.resolve(repo_type, repo_id, revision)
        current = store.files(repo_type, repo_id, sha)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": current.get(f["path"])}
            for f in payload.get("files", [])
        ]
        self._json({"files": files, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        """Apply an NDJSON commit: a ``header`` line, then ``file`` / ``deletedFile`` / ``deletedFolder``."""
        header: dict[str, Any] = {}
        adds: dict[str, bytes] = {}
        deletes: list[tuple[str, bool]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            op = json.loads(line)
            key, value = op["key"], op["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                is_b64 = value.get("encoding") == "base64"
                adds[value["path"]] = base64.b64decode(content) if is_b64 else content.encode()
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append((value["path"], key == "deletedFolder"))
            else:
                raise HubError(400, f"Unsupported commit operation {key!r} (the test server takes no LFS)")
        sha = self.server.store.commit(
            repo_type,
            repo_id,
            revision,
            header.get("summary", ""),
            adds,
            deletes,
            header.get("parentCommit"),
        )
        commit_url = f"{self._repo_url(repo_type, repo_id)}/commit/{sha}"
        self._json(
            {"success": True, "commitOid": sha, "commitUrl": commit_url, "hookOutput": "", "pullRequestUrl": None}
        )

    def _validate_yaml(self, content: str) -> None:
        """Accept a README whose ``---`` metadata block, if any, is closed (no YAML parser in stdlib)."""
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (line.strip() for line in lines[1:]):
            return self._json({"errors": [{"message": "metadata block is not closed by '---'"}]}, status=400)
        self._json({"errors": [], "warnings": []})


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # keep-alive handler threads never block shutdown
    block_on_close = False

    def __init__(self, store: RepoStore):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.store = store
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.log: list[tuple[str, str]] = []


class HubServer:
    """Hub-compatible server on 127.0.0.1 (free port), served from a background thread.

    Use as a context manager; ``endpoint`` is valid inside it. ``log`` lists the
    ``(method, path)`` of every request, so tests can check what a client called.
    """

    def __init__(self, storage_dir: Path):
        self.storage_dir = Path(storage_dir)
        self.store = RepoStore(self.storage_dir)
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return self._httpd.endpoint

    @property
    def log(self) -> list[tuple[str, str]]:
        return self._httpd.log if self._httpd is not None else []

    def start(self) -> HubServer:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self._httpd = _HubHTTPServer(self.store)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()  # returns within one poll_interval
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, repo_id: str, filename: str, revision: str = "main") -> str:
        """Download URL of a model file, as ``hf_hub_url`` would build it."""
        return f"{self.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"

    def env(self, hf_home: Path) -> dict[str, str]:
        """Environment for a client subprocess: this endpoint, a private cache, a dummy token, online."""
        hf_home = Path(hf_home)
        hf_home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_CACHE=str(hf_home / "hub"),
            HF_TOKEN="hf_dummy_test_token",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
        )
        return env

    def run_python(self, code: str, hf_home: Path, *, cwd: Path | None = None, timeout: float = 120) -> str:
        """Run ``code`` in a fresh interpreter against this server; return stdout, fail loudly on error.

        A fresh process is needed because ``HF_ENDPOINT`` is read when ``huggingface_hub`` is imported.
        """
        env = self.env(hf_home)
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=str(cwd or hf_home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"client subprocess failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
                f"\n--- stderr ---\n{proc.stderr[-8000:]}"
            )
        return proc.stdout


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A started :class:`HubServer` storing its repos under ``tmp_path / "hub-storage"``."""
    with HubServer(tmp_path / "hub-storage") as server:
        yield server
