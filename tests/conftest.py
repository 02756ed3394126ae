"""Shared fixtures and the rules every test runs under.

- `default_server`: a real `mlx-server` process serving the default model, started once per
  session (the model loads in a few seconds, but every prompt it has not seen costs seconds on
  the CPU, so modules should reuse it and its prompt cache). A failed test that used a server
  gets the tail of that server's log in its report.
- The path guard: a test (setup, call or teardown) that opens a file outside the repository
  fails, naming the path and the code that opened it (`mlx_server.testing.pathguard`).
- Tiers: `slow` means the test starts a process, loads the real default model or runs for
  several seconds of CPU. A test that uses a fixture returning a `ServerProcess` is marked
  `slow` here; others mark themselves, and the guard fails a test that starts a process without
  the mark. `uv run pytest -m "not slow"` is the fast inner loop.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from mlx_server.testing.pathguard import PathGuard, default_roots
from mlx_server.testing.server import ServerProcess, run_server

LOG_TAIL_CHARS = 6000
REPO_ROOT = Path(__file__).resolve().parent.parent
GUARD = pytest.StashKey[PathGuard]()


# --------------------------------------------------------------------------- the path guard


def pytest_configure(config: pytest.Config) -> None:
    basetemp = config.option.basetemp
    roots = default_roots(REPO_ROOT, [basetemp] if basetemp else [])
    guard = PathGuard(REPO_ROOT, roots)
    guard.install()
    config.stash[GUARD] = guard


@pytest.fixture
def path_guard(request: pytest.FixtureRequest) -> PathGuard:
    """The session's guard, for tests of the guard itself."""
    return request.config.stash[GUARD]


def _guarded(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    guard = item.config.stash[GUARD]
    guard.take()  # whatever pytest itself did between tests is not the test's
    guard.take_spawns()
    guard.active = True
    try:
        yield
    finally:
        guard.active = False
    problems = []
    accesses = guard.take()
    if accesses:
        problems.append(
            (
                f"opened paths outside the repository {REPO_ROOT} (a fresh clone has nothing"
                " beside it)",
                accesses,
            )
        )
    spawns = guard.take_spawns()
    if spawns and item.get_closest_marker("slow") is None:
        problems.append(("started a process but is not marked slow", spawns))
    if problems:
        text = []
        for why, found in problems:
            listed = "\n  ".join(a.describe() for a in found[:3])
            more = f"\n  ... and {len(found) - 3} more" if len(found) > 3 else ""
            text.append(f"the test's {phase} {why}:\n  {listed}{more}")
        pytest.fail("\n".join(text), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _guarded(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _guarded(item, "teardown"))


# --------------------------------------------------------------------------- tiers


def _starts_a_server(fixturedef: pytest.FixtureDef[object]) -> bool:
    annotation = inspect.signature(fixturedef.func).return_annotation
    return "ServerProcess" in str(annotation)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that uses a fixture returning a `ServerProcess` (directly or
    through other fixtures): it starts a server process."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("slow"):
            continue
        if any(
            _starts_a_server(fixturedef)
            for name in info.names_closure
            for fixturedef in info.name2fixturedefs.get(name, ())
        ):
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------------------------------- servers


def _clean_env() -> dict[str, str]:
    """Blank out the developer's own MLX_SERVER_* / LOG_LEVEL (an empty variable is unset)."""
    return {
        name: "" for name in os.environ if name.startswith("MLX_SERVER_") or name == "LOG_LEVEL"
    }


def _log_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        return f"<no server log at {path}: {exc}>"


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real server, default model, on a free port; stopped at the end of the session."""
    yield from _serve([], tmp_path_factory, "srv")


def _serve(
    args: Sequence[str],
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Run a server for a fixture; a start-up failure fails the test with the server's log."""
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    with contextlib.ExitStack() as stack:
        server: ServerProcess | None = None
        failure = ""
        try:
            server = stack.enter_context(
                run_server(args, env={**_clean_env(), **(env or {})}, log_path=log_path)
            )
        except Exception as exc:
            failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if server is None:  # failed outside the except: no chained traceback repeating the log
            pytest.fail(
                f"mlx-server {list(args)} did not start: {failure}\n"
                f"--- server log ({log_path}) ---\n{_log_text(log_path)}",
                pytrace=False,
            )
        yield server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Append the tail of each server's log to the report of a failed test that used it."""
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name, value in funcargs.items():
            if isinstance(value, ServerProcess):
                tail = _log_text(value.log_path)[-LOG_TAIL_CHARS:]
                report.sections.append((f"server log ({name}, tail)", tail))
    return report
