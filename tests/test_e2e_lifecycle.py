"""Start-up and shutdown of the real server process: SIGTERM lets short requests finish within
the grace period, ends longer streams with an in-band error, and exits 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from mlx_server.testing.server import run_server
from mlx_server.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path)
    return path


def chat(max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


@pytest.mark.slow  # starts a process
def test_sigterm_ends_long_streams_with_an_error_and_exits_0(
    tiny_dir: Path, tmp_path: Path
) -> None:
    args = ["--model", str(tiny_dir), "--shutdown-grace", "1"]
    with run_server(args, log_path=tmp_path / "log") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=chat(100_000, True)) as r:
                lines = r.iter_lines()
                payloads: list[str] = []
                for line in lines:
                    if line.startswith("data: "):
                        payloads.append(line[6:])
                    if len(payloads) == 3:
                        server.process.send_signal(signal.SIGTERM)
                        break
                payloads += [line[6:] for line in lines if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert "shutting down" in error["message"]
        assert server.process.wait(timeout=30) == 0


@pytest.mark.slow  # starts a process
def test_sigterm_lets_a_short_request_finish(tiny_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_dir), "--shutdown-grace", "30"]
    with run_server(args, log_path=tmp_path / "log") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=chat(200, True)) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        server.process.send_signal(signal.SIGTERM)
                        break
                rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        finals = [json.loads(p) for p in rest[:-1]]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(timeout=30) == 0
        # New connections are refused once it stops.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/health")


@pytest.mark.slow  # starts a process
def test_model_aliases(tiny_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_dir), "--model-aliases", "claude-*,gpt-4o"]
    with run_server(args, log_path=tmp_path / "log") as server:
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            body = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            r = client.post("/v1/messages", json={**body, "model": "claude-sonnet-4-5"})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "tiny-llama"
            r = client.post("/v1/chat/completions", json={**body, "model": "GPT-4o"})
            assert r.status_code == 200, r.text
            r = client.post("/v1/chat/completions", json={**body, "model": "gpt-5"})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
