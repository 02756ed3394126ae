"""Catch a test process opening files outside the repository.

A project's tests must pass from a fresh clone with nothing beside it; a test that reads
a file beside the checkout passes on the author's machine and fails everywhere else. ``PathGuard``
installs an audit hook (``sys.addaudithook``) that sees every ``open`` (and directory listing)
the Python process makes, and records those outside the allowed roots: the repository, the
interpreter and its site-packages, the temporary directory, ``/dev``, ``/proc``, ``/sys``, and
the few system files the standard library reads on its own (MIME types, time zones, the OS
name). Anything beside the checkout (its parent's other children) is refused even when a broad
root would allow it. Native code (MLX, tokenizers) opening files is not seen; subprocesses are not
guarded (each is its own interpreter).

The same hook notes the processes a test starts, so that the test tiers stay honest: a test
not marked ``slow`` must not start one.

The hook only records (raising inside it would change the behaviour of libraries that catch
``OSError``); the pytest plugin in ``tests/conftest.py`` fails the test that made the record.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

import attrs

__all__ = ["Access", "PathGuard", "default_roots"]

PATH_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})
SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.system", "os.exec"}
)
WATCHED_EVENTS = PATH_EVENTS | SPAWN_EVENTS

# Files outside the tree that the standard library itself reads, whatever the test does
# (devices and kernel views, time zones, the OS name that SDKs put in their headers).
SYSTEM_ROOTS = (
    "/dev",
    "/proc",
    "/sys",
    "/usr/share/zoneinfo",
    "/etc/localtime",
    "/etc/os-release",
    "/usr/lib/os-release",
)


@attrs.frozen
class Access:
    """One refused access: the path as opened, and where in the code it happened."""

    event: str
    path: str
    where: tuple[str, ...]

    def describe(self) -> str:
        frames = "\n    ".join(self.where) or "(no Python frame)"
        return f"{self.event} {self.path!r}\n    {frames}"


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def default_roots(repo_root: Path, extra: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """The roots a test process may open files under (besides the repository)."""
    import mimetypes

    candidates: list[str] = [
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        *sysconfig.get_paths().values(),
        *site.getsitepackages(),
        *(p for p in sys.path if p),
        tempfile.gettempdir(),
        *SYSTEM_ROOTS,
        *(os.fspath(p) for p in mimetypes.knownfiles),
        *(os.fspath(p) for p in extra),
    ]
    uv_cache = os.environ.get("UV_CACHE_DIR") or os.path.expanduser("~/.cache/uv")
    uv_python = os.environ.get("UV_PYTHON_INSTALL_DIR") or os.path.expanduser(
        "~/.local/share/uv/python"
    )
    candidates += [uv_cache, uv_python]
    return sorted({_real(c) for c in candidates})


class PathGuard:
    """Records every open outside ``repo_root`` and ``roots`` while ``active``."""

    def __init__(self, repo_root: Path, roots: Iterable[str]) -> None:
        self.repo_root = _real(os.fspath(repo_root))
        self.parent = os.path.dirname(self.repo_root)
        self.roots = tuple(sorted({r for r in roots if r != os.sep}))  # "/" would allow all
        self.active = False
        self.accesses: list[Access] = []
        self.spawns: list[Access] = []  # processes started (any path: they are not reads)
        self._local = threading.local()
        self._verdicts: dict[str, bool] = {}
        self._lock = threading.Lock()

    # -- the policy

    def allowed(self, path: str) -> bool:
        verdict = self._verdicts.get(path)
        if verdict is None:
            real = _real(path)
            if _under(real, self.repo_root):
                verdict = True
            elif self.parent != os.sep and _under(real, self.parent):
                verdict = False  # beside the checkout: exactly what a fresh clone lacks
            else:
                verdict = any(_under(real, root) for root in self.roots)
            self._verdicts[path] = verdict
        return verdict

    # -- the hook

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if event not in WATCHED_EVENTS or not self.active:
            return
        if getattr(self._local, "busy", False):
            return  # our own work (realpath) must not recurse into the hook
        self._local.busy = True
        try:
            if event in SPAWN_EVENTS:
                what = args[0] if args else None
                spawn = Access(event=event, path=repr(what)[:200], where=_frames(sys._getframe(1)))
                with self._lock:
                    self.spawns.append(spawn)
                return
            target = args[0] if args else None
            if target is None or isinstance(target, int):
                return  # a file descriptor: its opening was checked already
            if isinstance(target, bytes):
                target = os.fsdecode(target)
            if not isinstance(target, str | os.PathLike):
                return
            path = os.fspath(target)
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if event != "open" and path == "":
                path = "."
            if not self.allowed(path):
                access = Access(event=event, path=path, where=_frames(sys._getframe(1)))
                with self._lock:
                    self.accesses.append(access)
        finally:
            self._local.busy = False

    def take(self) -> list[Access]:
        """The refused accesses recorded since the last call (and forget them)."""
        with self._lock:
            out, self.accesses = self.accesses, []
        return out

    def take_spawns(self) -> list[Access]:
        """The processes started since the last call (and forget them)."""
        with self._lock:
            out, self.spawns = self.spawns, []
        return out


def _frames(frame: FrameType | None, limit: int = 6) -> tuple[str, ...]:
    """file:line of the innermost frames, without reading any source (no open in the hook)."""
    out: list[str] = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        out.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    return tuple(out)
