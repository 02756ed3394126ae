"""A fake Hugging Face hub on 127.0.0.1, so pulls can be tested end to end without the network.

`FakeHub` serves model repos from a dict `{repo_id: {filename: bytes}}` over plain HTTP, speaking
the part of the hub's protocol that `huggingface_hub.snapshot_download` and `hf_hub_download`
use (no Xet):

- `GET /api/models/{repo}[/revision/{rev}]`: repo info with the commit `sha` and `siblings`
  (sizes, blob ids and LFS data with `?blobs=true`);
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...`: the tree listing (files with size,
  git oid and LFS data, folders), paged with a `Link: <...>; rel="next"` header like the hub's;
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}`: the file, with `X-Repo-Commit`, `ETag` (the git
  blob id, or the sha256 for LFS files, which also get `X-Linked-Etag` and `X-Linked-Size`),
  `Content-Length`, and single `Range` requests answered with 206;
- errors the hub's way: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound` or
  `EntryNotFound` (the last with `X-Repo-Commit`), and for gated repos the files (not the info
  or the tree, which the hub shows anyone) answer 401, or 403 to a caller with a token, with
  `X-Error-Code: GatedRepo`. `huggingface_hub` turns these into its own error classes;
- `GET /api/agent-harnesses`: an empty registry (huggingface_hub fetches it from `HF_ENDPOINT`,
  not from the `endpoint` argument, before its first request).

Every request is recorded (`requests`, `count`), so a test can tell a cached pull from a
download. `chunk_size` / `chunk_delay` serve file bodies slowly, so progress can be watched
over several updates. The server runs in a thread; leaving the `with` block closes the open
connections (huggingface_hub keeps them alive in its pool), joins every thread, and returns.

`loopback_only()` makes sure a block of code (in any thread) connects nowhere but the loopback
interface: it records and refuses every other connection or name lookup, and fails on exit if
there were any.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import sys
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attrs

__all__ = ["FakeHub", "HubFile", "HubRequest", "NonLoopbackAccess", "loopback_only"]

# Files the hub keeps in LFS (the extensions of the hub's default .gitattributes that matter here).
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".npz", ".h5", ".onnx", ".model")
DATE = "2026-01-01T00:00:00.000Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding `data` (what the hub calls a file's `oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@attrs.frozen(kw_only=True)
class HubFile:
    """A file in a fake repo, with the ids the hub reports for it."""

    path: str
    data: bytes = attrs.field(repr=False)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer git stores instead of an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {self.size}\n"
        ).encode()

    @property
    def oid(self) -> str:
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@attrs.frozen(kw_only=True)
class HubRequest:
    """One request the fake hub answered."""

    method: str
    path: str  # decoded, without the query
    kind: str  # "info", "tree", "resolve" or "other"
    repo_id: str | None = None
    filename: str | None = None  # for "resolve"
    status: int = 0
    range: str | None = None
    authorized: bool = False  # sent an Authorization header


@attrs.define(eq=False)
class _Repo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str
    gated: bool

    @classmethod
    def build(cls, repo_id: str, files: Mapping[str, bytes], *, gated: bool) -> _Repo:
        built = {name: HubFile(path=name, data=bytes(data)) for name, data in files.items()}
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(built):
            digest.update(f"\0{name}\0{built[name].oid}".encode())
        return cls(repo_id=repo_id, files=built, sha=digest.hexdigest(), gated=gated)

    def has_revision(self, revision: str) -> bool:
        return revision in ("main", self.sha)

    def folders(self) -> list[str]:
        out: set[str] = set()
        for name in self.files:
            parts = name.split("/")[:-1]
            out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return sorted(out)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads
    block_on_close = True
    hub: FakeHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that went away
            return
        self.hub.errors.append(repr(exc))


class FakeHub:
    """A fake hub serving `repos` on 127.0.0.1; `with FakeHub(...) as url:` gives its base URL.

    `gated` names repos whose files need access the caller does not have. `chunk_size` and
    `chunk_delay` send file bodies `chunk_size` bytes at a time, waiting `chunk_delay` seconds
    before each. `page_size` is the number of tree entries per page (the hub's is 1000)."""

    def __init__(
        self,
        repos: Mapping[str, Mapping[str, bytes]],
        *,
        gated: Collection[str] = (),
        chunk_size: int = 64 * 1024,
        chunk_delay: float = 0.0,
        page_size: int = 1000,
        timeout: float = 10.0,
    ) -> None:
        if chunk_size < 1 or page_size < 1 or chunk_delay < 0:
            raise ValueError("chunk_size and page_size must be positive, chunk_delay >= 0")
        self.repos = {
            repo_id: _Repo.build(repo_id, files, gated=repo_id in gated)
            for repo_id, files in repos.items()
        }
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.page_size = page_size
        self.timeout = timeout  # a stalled connection is dropped after this many seconds
        self.errors: list[str] = []  # unexpected exceptions in the handlers
        self._requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> str:
        if self._server is not None:
            raise RuntimeError("the fake hub is already running")
        self._stopping.clear()
        server = _Server(("127.0.0.1", 0), _make_handler(self))
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub"
        )
        self._thread.start()
        return self.url

    def close(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        with self._lock:
            self._stopping.set()  # slow bodies stop waiting; late connections end at once
            connections = list(self._connections)
        for conn in connections:  # wake handlers waiting on kept-alive connections
            _shut(conn)
        server.shutdown()  # stop accepting
        server.server_close()  # joins the handler threads
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ what was asked

    def commit(self, repo_id: str) -> str:
        """The commit sha `repo_id`'s main branch points at (derived from its files)."""
        return self.repos[repo_id].sha

    @property
    def requests(self) -> list[HubRequest]:
        with self._lock:
            return list(self._requests)

    def count(
        self, *, method: str | None = None, kind: str | None = None, repo_id: str | None = None
    ) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and (kind is None or r.kind == kind)
            and (repo_id is None or r.repo_id == repo_id)
        )

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """The files fetched with a successful GET, in order."""
        return [
            r.filename
            for r in self.requests
            if r.kind == "resolve"
            and r.method == "GET"
            and r.status in (200, 206)
            and r.filename is not None
            and (repo_id is None or r.repo_id == repo_id)
        ]

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: HubRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _track(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if not open_:
                self._connections.discard(conn)
            elif self._stopping.is_set():  # accepted just before close(): end it at once
                _shut(conn)
            else:
                self._connections.add(conn)


def _shut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------------- the protocol

_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Reply(Exception):
    """An error answer: a status, the hub's error code and message, extra headers."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """`[start, end)` of a single `bytes=` range (`N-`, `N-M`, `-N`), None if unsatisfiable."""
    match = _RANGE.match(header.strip())
    if match is None or not any(match.groups()):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # the last N bytes
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), min(int(last) + 1, size) if last else size
    return (start, end) if start < size and start < end else None


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the hub
        server_version = "FakeHub/1"
        timeout = hub.timeout

        def setup(self) -> None:
            super().setup()
            hub._track(self.connection, open_=True)

        def finish(self) -> None:
            hub._track(self.connection, open_=False)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the request log is `hub.requests`

        def do_GET(self) -> None:
            self._dispatch(head=False)

        def do_HEAD(self) -> None:
            self._dispatch(head=True)

        # -------------------------------------------------------------- dispatch

        def _dispatch(self, *, head: bool) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            request = HubRequest(
                method=self.command,
                path=path,
                kind="other",
                range=self.headers.get("Range"),
                authorized="Authorization" in self.headers,
            )
            status = 500
            try:
                if match := _API.match(split.path):
                    repo_id, what, rev, sub = (
                        unquote(g) if g is not None else None for g in match.groups()
                    )
                    assert repo_id is not None
                    kind = "tree" if what == "tree" else "info"
                    request = attrs.evolve(request, kind=kind, repo_id=repo_id)
                    repo, rev = self._repo(repo_id), rev or "main"
                    if kind == "tree":
                        status = self._tree(repo, rev, (sub or "").strip("/"), query, head)
                    else:
                        status = self._info(repo, rev, query, head)
                elif match := _RESOLVE.match(split.path):
                    repo_id, rev, filename = (unquote(g) for g in match.groups())
                    request = attrs.evolve(
                        request, kind="resolve", repo_id=repo_id, filename=filename
                    )
                    status = self._resolve(self._repo(repo_id), rev, filename, head)
                elif split.path == "/api/agent-harnesses":
                    # huggingface_hub's agent detection asks `HF_ENDPOINT` for this once a day
                    status = self._json(200, {"standardEnvVars": [], "harnesses": {}}, head)
                else:
                    raise _Reply(404, None, "Not Found")
            except _Reply as reply:
                status = reply.status
                self._error(reply, head)
            finally:
                hub._record(attrs.evolve(request, status=status))

        def _repo(self, repo_id: str) -> _Repo:
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise _Reply(404, "RepoNotFound", "Repository not found")
            return repo

        def _revision(self, repo: _Repo, rev: str) -> None:
            if not repo.has_revision(rev):
                raise _Reply(404, "RevisionNotFound", f"Invalid rev id: {rev}")

        # -------------------------------------------------------------- answers

        def _info(self, repo: _Repo, rev: str, query: Mapping[str, str], head: bool) -> int:
            self._revision(repo, rev)
            blobs = query.get("blobs", "").lower() == "true"
            siblings: list[dict[str, Any]] = []
            for f in sorted(repo.files.values(), key=lambda f: f.path):
                sibling: dict[str, Any] = {"rfilename": f.path}
                if blobs:
                    sibling |= {"size": f.size, "blobId": f.oid}
                    if f.lfs:
                        sibling["lfs"] = {
                            "sha256": f.sha256,
                            "size": f.size,
                            "pointerSize": len(f.pointer),
                        }
                siblings.append(sibling)
            owner = repo.repo_id.split("/")[0]
            body = {
                "_id": repo.sha[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": owner,
                "sha": repo.sha,
                "lastModified": DATE,
                "createdAt": DATE,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["mlx"],
                "library_name": "mlx",
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(f.size for f in repo.files.values()),
            }
            return self._json(200, body, head)

        def _tree(
            self, repo: _Repo, rev: str, sub: str, query: Mapping[str, str], head: bool
        ) -> int:
            self._revision(repo, rev)
            recursive = query.get("recursive", "").lower() == "true"
            entries: list[dict[str, Any]] = []
            for folder in repo.folders():
                entries.append(
                    {
                        "type": "directory",
                        "oid": hashlib.sha1(folder.encode()).hexdigest(),
                        "size": 0,
                        "path": folder,
                    }
                )
            for f in repo.files.values():
                entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": f.size}
                entry["path"] = f.path
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                entries.append(entry)
            prefix = sub + "/" if sub else ""
            if sub and sub not in repo.files and sub not in repo.folders():
                message = f"{sub} does not exist on {rev}"
                raise _Reply(404, "EntryNotFound", message, {"X-Repo-Commit": repo.sha})
            entries = [
                e
                for e in entries
                if e["path"].startswith(prefix)
                and (recursive or "/" not in e["path"][len(prefix) :])
            ]
            entries.sort(key=lambda e: e["path"])
            try:
                start = int(query.get("cursor", "0"))
            except ValueError:
                raise _Reply(400, None, "Invalid cursor") from None
            page = entries[start : start + hub.page_size]
            headers: dict[str, str] = {}
            if start + hub.page_size < len(entries):
                params = f"recursive={str(recursive).lower()}&expand=false"
                nxt = f"{hub.url}/api/models/{repo.repo_id}/tree/{quote(rev, safe='')}"
                if sub:
                    nxt += "/" + quote(sub, safe="")
                headers["Link"] = f'<{nxt}?{params}&cursor={start + hub.page_size}>; rel="next"'
            return self._json(200, page, head, headers)

        def _resolve(self, repo: _Repo, rev: str, filename: str, head: bool) -> int:
            if repo.gated and "Authorization" in self.headers:
                message = (
                    f"Access to model {repo.repo_id} is restricted and you are not in the "
                    "authorized list. Visit the repo's page to ask for access."
                )
                raise _Reply(403, "GatedRepo", message)
            if repo.gated:
                message = (
                    f"Access to model {repo.repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in."
                )
                raise _Reply(401, "GatedRepo", message)
            self._revision(repo, rev)
            f = repo.files.get(filename)
            if f is None:
                raise _Reply(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.sha})
            headers = {
                "X-Repo-Commit": repo.sha,
                "ETag": f'"{f.etag}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if f.lfs:
                headers["X-Linked-Etag"] = f'"{f.sha256}"'
                headers["X-Linked-Size"] = str(f.size)
            start, end, status = 0, f.size, 200
            if (wanted := self.headers.get("Range")) is not None:
                span = _byte_range(wanted, f.size)
                if span is None:
                    unsatisfiable = {"Content-Range": f"bytes */{f.size}"}
                    raise _Reply(416, None, "Range Not Satisfiable", unsatisfiable)
                (start, end), status = span, 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if not head:
                self._body(f.data[start:end])
            return status

        def _body(self, data: bytes) -> None:
            step = hub.chunk_size
            for offset in range(0, len(data), step):
                if hub.chunk_delay and hub._stopping.wait(hub.chunk_delay):
                    self.close_connection = True
                    return
                self.wfile.write(data[offset : offset + step])

        def _json(
            self, status: int, body: object, head: bool, headers: Mapping[str, str] = {}
        ) -> int:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)
            return status

        def _error(self, reply: _Reply, head: bool) -> None:
            headers = dict(reply.headers)
            if reply.code is not None:
                headers["X-Error-Code"] = reply.code
                headers["X-Error-Message"] = reply.message
            self._json(reply.status, {"error": reply.message}, head, headers)

    return Handler


# ---------------------------------------------------------------------- the loopback guard


class NonLoopbackAccess(AssertionError):
    """Code under `loopback_only()` tried to reach a host other than the loopback interface."""


@attrs.define
class _Guard:
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    depth: int = 0
    installed: bool = False
    refused: list[str] = attrs.field(factory=list)


_GUARD = _Guard()
_NET_EVENTS = frozenset({"socket.connect", "socket.getaddrinfo", "socket.gethostbyname"})


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is None:  # getaddrinfo(None, ...): the local wildcard
        return True
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _GUARD.depth or event not in _NET_EVENTS:
        return
    if event == "socket.connect":
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return  # Unix sockets and the like stay on this machine
        host = address[0] if isinstance(address, tuple) and address else address
    else:
        host = args[0]
    if _is_loopback(host):
        return
    with _GUARD.lock:
        _GUARD.refused.append(f"{event} {host!r}")
    raise NonLoopbackAccess(f"loopback_only: refused {event} to {host!r}")


@contextmanager
def loopback_only() -> Iterator[None]:
    """Refuse (and record) every connection or name lookup, from any thread, for a host that is
    not loopback while the block runs; fail on exit if there was one, even if the code under test
    swallowed the error (huggingface_hub falls back to its cache on connection errors)."""
    with _GUARD.lock:
        if not _GUARD.installed:
            sys.addaudithook(_audit)  # for the life of the process: audit hooks cannot be removed
            _GUARD.installed = True
        _GUARD.depth += 1
        start = len(_GUARD.refused)
    try:
        yield
    finally:
        with _GUARD.lock:
            _GUARD.depth -= 1
            refused = _GUARD.refused[start:]
        if refused:
            raise NonLoopbackAccess("reached beyond the loopback interface: " + "; ".join(refused))
