"""A fake Hugging Face Hub over real HTTP, for tests that run huggingface_hub unmodified.

It answers what huggingface_hub 2.x calls for a download: the model-info API
(`/api/models/{repo}/revision/{rev}`), HEAD and GET of `/{repo}/resolve/{rev}/{path}` with the headers it
reads (X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size), and Range requests. Large ("LFS") files redirect
to a second server on another port, as the Hub redirects to its CDN, so huggingface_hub takes its real
redirect path and drops the Authorization header there. Errors carry the X-Error-Code values
huggingface_hub turns into RepositoryNotFound / RevisionNotFound / EntryNotFound / GatedRepo errors.
No X-Xet-* header is ever sent, which keeps huggingface_hub on plain HTTP even with hf_xet installed.

Tests define repos as {path: bytes}, read `requests` to see what was asked, and inject faults per file:
`drop_connection` (close the socket after N body bytes) and `stall` (pause after N bytes until released).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

# The Hub stores these in LFS (see a default .gitattributes); everything else is a plain git blob.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # URL path, unquoted
    file: str | None  # repo file it concerns, if any
    range: str | None
    authorization: str | None


@dataclass(slots=True)
class Stall:
    """Pause a download after `after_bytes` body bytes until `release()`; `reached` is set once paused."""

    after_bytes: int
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass(frozen=True, slots=True)
class _Drop:
    after_bytes: int


@dataclass(slots=True)
class _Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    gated: bool = False


class FakeHub:
    """Start with `with FakeHub() as hub:`; point huggingface_hub at it with HF_ENDPOINT=hub.url."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """tls: serve HTTPS with this server context (a mirror behind its own CA)."""
        self._tls = tls
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (repo file path, content), for the CDN
        self._faults: dict[str, list[_Drop | Stall]] = {}
        self._stalls: list[Stall] = []
        self.requests: list[RecordedRequest] = []
        self._answers: list[list[Any]] = []  # answer_instead's
        self._hub = self._serve("hub")
        self._cdn = self._serve("cdn")
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"{scheme}://127.0.0.1:{self._cdn.server_address[1]}"

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        refs: tuple[str, ...] = ("main",),
        token: str | None = None,
        gated: bool = False,
    ) -> str:
        """Add a commit holding `files` to `repo_id` and point `refs` (branches or tags) at it.

        With `token`, the repo is private (or gated, with `gated=True`) and only that Bearer token reads it.
        Returns the commit sha.
        """
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            repo.token, repo.gated = token, gated
            digest = hashlib.sha1(repo_id.encode())
            digest.update(str(len(repo.commits)).encode())
            for path in sorted(files):
                digest.update(path.encode() + b"\0" + files[path])
            commit = digest.hexdigest()
            repo.commits[commit] = dict(files)
            repo.refs.update(dict.fromkeys(refs, commit))
            for path, content in files.items():
                self._blobs[hashlib.sha256(content).hexdigest()] = (path, content)
        return commit

    def drop_connection(self, path: str, after_bytes: int) -> None:
        """The next GET of repo file `path` closes the connection after `after_bytes` body bytes."""
        with self._lock:
            self._faults.setdefault(path, []).append(_Drop(after_bytes))

    def stall(self, path: str, after_bytes: int) -> Stall:
        """The next GET of repo file `path` pauses after `after_bytes` body bytes until released."""
        stall = Stall(after_bytes)
        with self._lock:
            self._faults.setdefault(path, []).append(stall)
            self._stalls.append(stall)
        return stall

    def answer_instead(
        self, server: str, path_part: str, status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None,
        truncate: int | None = None, times: int = 1,
    ) -> None:
        """The next `times` GETs to `server` ("hub" or "cdn") whose path holds `path_part` get this answer
        instead: a status and body (a proxy's page, a CDN's refusal), or with `truncate`, the CDN's file cut
        to that many bytes, announced at that length (a transfer that came up short)."""
        with self._lock:
            self._answers.append([server, path_part, status, body, headers or {}, truncate, times])

    def _answer_instead(self, server: str, path: str) -> tuple[int, bytes, dict[str, str]] | None:
        with self._lock:
            for fault in self._answers:
                name, part, status, body, headers, truncate, times = fault
                if times and name == server and part in path:
                    fault[6] -= 1
                    if truncate is not None:
                        return 200, self._blobs[path][1][:truncate], {"Content-Type": "application/octet-stream"}
                    return status, body, headers
        return None

    def gets(self, path: str) -> list[RecordedRequest]:
        """GET requests that transferred repo file `path` (from the hub or the CDN)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.file == path]

    def close(self) -> None:
        for stall in self._stalls:
            stall.release()
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _serve(self, name: str) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        if self._tls is not None:
            server.socket = self._tls.wrap_socket(server.socket, server_side=True)
        server.hub = self  # type: ignore[attr-defined]
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, args=(0.05,), name=f"fake-{name}", daemon=True).start()
        return server

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_fault(self, path: str) -> _Drop | Stall | None:
        with self._lock:
            pending = self._faults.get(path)
            return pending.pop(0) if pending else None


_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_MODEL = re.compile(r"^/api/models/(?P<repo>.+?)(?:/revision/(?P<rev>[^/]+))?$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and byte-exact Content-Length, like the Hub

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        raw_path = urlsplit(self.path).path
        if self.command == "GET" and (instead := self.hub._answer_instead(self.server.name, unquote(raw_path).lstrip("/"))):  # type: ignore[attr-defined]
            status, body, headers = instead
            self._record(None)
            self._answer(status, headers, body)
            return
        if self.server.name == "cdn":  # type: ignore[attr-defined]
            self._cdn(raw_path.lstrip("/"))
        elif match := _API_MODEL.match(raw_path):
            self._model_info(unquote(match["repo"]), unquote(match["rev"] or "main"))
        elif match := _RESOLVE.match(raw_path):
            self._resolve(unquote(match["repo"]), unquote(match["rev"]), unquote(match["file"]))
        else:
            self._record(None)
            self._error(404, None, "Not found")

    def _record(self, file: str | None) -> None:
        self.hub._record(
            RecordedRequest(
                server=self.server.name,  # type: ignore[attr-defined]
                method=self.command,
                path=unquote(urlsplit(self.path).path),
                file=file,
                range=self.headers.get("Range"),
                authorization=self.headers.get("Authorization"),
            )
        )

    def _authorize(self, repo_id: str, *, for_files: bool) -> _Repo | None:
        """The repo if the caller may read it, else None once the Hub's error answer was sent."""
        repo = self.hub._repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is None or (repo.token and not repo.gated and auth != f"Bearer {repo.token}"):
            # The Hub answers 401 without a token and 404 with one, for missing and private repos alike.
            self._error(404 if auth else 401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and for_files and auth != f"Bearer {repo.token}":
            message = f"Access to model {repo_id} is restricted"
            self._error(403 if auth else 401, "GatedRepo", message)
            return None
        return repo

    def _commit(self, repo_id: str, repo: _Repo, revision: str) -> str | None:
        commit = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _model_info(self, repo_id: str, revision: str) -> None:
        self._record(None)
        repo = self._authorize(repo_id, for_files=False)
        if repo is None:
            return
        commit = self._commit(repo_id, repo, revision)
        if commit is None:
            return
        siblings = []
        for path, content in sorted(repo.commits[commit].items()):
            sibling: dict[str, object] = {
                "rfilename": path,
                "size": len(content),
                "blobId": _git_blob_id(content),
            }
            if path.endswith(LFS_SUFFIXES):
                sha256 = hashlib.sha256(content).hexdigest()
                sibling["lfs"] = {"size": len(content), "sha256": sha256, "pointerSize": 134}
            siblings.append(sibling)
        body = json.dumps(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": bool(repo.token) and not repo.gated,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "siblings": siblings,
            }
        ).encode()
        self._answer(200, {"Content-Type": "application/json"}, body)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._record(path)
        repo = self._authorize(repo_id, for_files=True)
        if repo is None:
            return
        commit = self._commit(repo_id, repo, revision)
        if commit is None:
            return
        content = repo.commits[commit].get(path)
        if content is None:
            self._error(
                404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": commit}
            )
            return
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(content).hexdigest()
            headers = {
                "Location": f"{self.hub.cdn_url}/{sha256}",
                "X-Repo-Commit": commit,
                "ETag": f'"{_git_blob_id(content)}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(content)),
            }
            self._answer(302, headers, b"")
            return
        self._send_file(path, content, {"X-Repo-Commit": commit, "ETag": f'"{_git_blob_id(content)}"'})

    def _cdn(self, sha256: str) -> None:
        blob = self.hub._blobs.get(sha256)
        self._record(blob[0] if blob else None)
        if blob is None:
            self._answer(404, {}, b"")
            return
        self._send_file(blob[0], blob[1], {"ETag": f'"{sha256}"'})

    def _send_file(self, path: str, content: bytes, headers: dict[str, str]) -> None:
        start = 0
        status = 200
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if (wanted := self.headers.get("Range")) and (match := re.fullmatch(r"bytes=(\d+)-", wanted)):
            start = int(match[1])
            if start >= len(content):
                self._answer(416, {"Content-Range": f"bytes */{len(content)}"}, b"")
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        body = content[start:]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        fault = self.hub._next_fault(path)
        if isinstance(fault, _Drop):
            self.wfile.write(body[: fault.after_bytes])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(fault, Stall):
            self.wfile.write(body[: fault.after_bytes])
            self.wfile.flush()
            fault.reached.set()
            fault.released.wait()
            body = body[fault.after_bytes :]
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (a killed downloader)

    def _error(
        self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None
    ) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._answer(status, headers, json.dumps({"error": message}).encode())

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
