"""Shared fixtures: a real `mlx-server` process serving the default model.

`default_server` starts once per test session (the model loads in a few seconds, but every
prompt it has not seen costs seconds on the CPU, so modules should reuse it and its prompt
cache). A failed test that used a server gets the tail of that server's log in its report.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from mlx_server.testing.server import ServerProcess, run_server

LOG_TAIL_CHARS = 6000


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
