"""Faults inside a real server process: the model still loading, and the executor raising in
the middle of a stream. The faults are injected by a launcher script that patches the engine
before running the normal CLI."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from mlx_server.testing.server import run_server
from mlx_server.testing.tiny import build_tiny_model

SLOW_LOAD = """
import sys, time
import mlx_server.engine.model as m
_load = m.load
def slow_load(*a, **k):
    time.sleep(4)
    return _load(*a, **k)
m.load = slow_load
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


def test_health_and_routes_answer_503_while_loading(tiny_dir: Path, tmp_path: Path) -> None:
    with run_server(
        ["--model", str(tiny_dir)],
        log_path=tmp_path / "log",
        launcher=launcher(tmp_path, SLOW_LOAD),
        wait_ready=False,
    ) as server:
        seen_loading = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{server.base_url}/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if r.status_code == 503:
                assert r.json()["status"] == "loading"
                v = httpx.get(f"{server.base_url}/v1/models", timeout=2)
                m = httpx.post(
                    f"{server.base_url}/v1/messages",
                    json={"model": "x", "max_tokens": 1, "messages": []},
                    timeout=2,
                )
                if v.status_code == 503 and m.status_code == 503:  # (not at the very end)
                    assert v.json()["error"]["code"] == "model_loading"
                    assert m.json()["type"] == "error"
                    assert m.json()["error"]["type"] == "api_error"
                    seen_loading = True
            elif r.status_code == 200:
                break
            time.sleep(0.1)
        assert seen_loading, "never saw the loading state"
        assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"


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
