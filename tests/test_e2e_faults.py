"""Faults inside a real server process: the model still loading, and the executor raising in
the middle of a stream. The faults are injected by a launcher script that patches the engine
before running the normal CLI."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

pytestmark = pytest.mark.slow  # every test here starts a server process

GATE_ENV = "TEST_LOAD_GATE_PORT"  # the port the test listens on (read by GATED_LOAD)

# Loading waits until the test, having seen the loading state, sends one byte: no sleep, and
# the state lasts exactly as long as the test needs, however slow the machine.
GATED_LOAD = """
import os, socket, sys
import mlx_server.engine.model as m
_load = m.load
def gated_load(*a, **k):
    with socket.create_connection(("127.0.0.1", int(os.environ["TEST_LOAD_GATE_PORT"]))) as gate:
        gate.recv(1)
    return _load(*a, **k)
m.load = gated_load
from mlx_server.cli import main
sys.exit(main())
"""

FAILING_DECODE = """
import sys
from mlx_server.engine import batch
_decode = batch.BatchEngine._decode
calls = {"n": 0}
def flaky_decode(self, events):
    calls["n"] += 1
    if calls["n"] == 6:
        raise RuntimeError("injected executor fault")
    return _decode(self, events)
batch.BatchEngine._decode = flaky_decode
from mlx_server.cli import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path)
    return path


def launcher(tmp_path: Path, code: str) -> list[str]:
    script = tmp_path / "launch.py"
    script.write_text(code)
    return [sys.executable, str(script)]


def health_status(server: ServerProcess, want: int, timeout: float = 120.0) -> httpx.Response:
    """Poll /health (bounded) until it answers with status code `want`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{server.base_url}/health", timeout=2)
            if r.status_code == want:
                return r
        except httpx.HTTPError:
            pass
        assert server.process.poll() is None, server.log()
        assert time.monotonic() < deadline, f"/health never answered {want}:\n{server.log()}"
        time.sleep(0.1)


def test_health_and_routes_answer_503_while_loading(tiny_dir: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as gate:
        gate.settimeout(120)
        with run_server(
            ["--model", str(tiny_dir)],
            env={GATE_ENV: str(gate.getsockname()[1])},
            log_path=tmp_path / "log",
            launcher=launcher(tmp_path, GATED_LOAD),
            wait_ready=False,
        ) as server:
            r = health_status(server, 503)
            assert r.json()["status"] == "loading"
            v = httpx.get(f"{server.base_url}/v1/models", timeout=2)
            assert v.status_code == 503 and v.json()["error"]["code"] == "model_loading"
            m = httpx.post(
                f"{server.base_url}/v1/messages",
                json={"model": "x", "max_tokens": 1, "messages": []},
                timeout=2,
            )
            assert m.status_code == 503, m.text
            assert m.json()["type"] == "error" and m.json()["error"]["type"] == "api_error"

            connection, _ = gate.accept()  # the loader is waiting on the gate
            with connection:
                connection.sendall(b"go")
                assert health_status(server, 200).json()["status"] == "ok"


def test_executor_fault_mid_stream_is_an_in_band_error(tiny_dir: Path, tmp_path: Path) -> None:
    with run_server(
        ["--model", str(tiny_dir)],
        log_path=tmp_path / "log",
        launcher=launcher(tmp_path, FAILING_DECODE),
    ) as server:
        body = {
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 50,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                payloads = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
            assert payloads[-1] == "[DONE]"
            error = json.loads(payloads[-2])["error"]
            assert "injected executor fault" in error["message"]
            contents = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[1:-2]]
            assert any(contents), "the fault should come after some text"
            # The server stays up and serves the next request in full.
            r2 = client.post("/v1/chat/completions", json={**body, "stream": False})
            assert r2.status_code == 200, r2.text
            assert r2.json()["usage"]["completion_tokens"] == 50
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["running"] == 0
