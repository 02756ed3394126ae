"""Start a real `mlx-server` process on a free port and wait until it is ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define(eq=False)
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    args: Sequence[str] = (),
    *,
    env: dict[str, str] | None = None,
    log_path: Path,
    ready_timeout: float = 180.0,
    launcher: Sequence[str] | None = None,
    wait_ready: bool = True,
) -> Iterator[ServerProcess]:
    """Run `python -m mlx_server --host 127.0.0.1 --port <free> *args` (or `launcher` instead
    of `python -m mlx_server`); yield once /health says ok (at once if not `wait_ready`); stop
    it with SIGTERM (then SIGKILL) on exit."""
    port = free_port()
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    # Let the server's imports be cached as bytecode: each start then skips recompiling
    # mlx-lm and transformers (seconds of CPU per server on a small machine).
    full_env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = list(launcher) if launcher is not None else [sys.executable, "-m", "mlx_server"]
    cmd = [*start, "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(process=proc, port=port, log_path=log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while wait_ready:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                r = httpx.get(f"{server.base_url}/health", timeout=2.0)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
