"""--api-key and --rate-limit through the real server, in each API's own error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mlx_server.api.access import RateLimiter
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def keyed_server(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with run_server(["--model", str(tiny_dir)], env={"MLX_SERVER_API_KEY": KEY}, log_path=log) as s:
        yield s


CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MESSAGES = {"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


def test_health_is_open(keyed_server: ServerProcess) -> None:
    assert httpx.get(f"{keyed_server.base_url}/health").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}])
def test_openai_routes_need_the_key(keyed_server: ServerProcess, headers: dict[str, str]) -> None:
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT)]:
        r = httpx.request(method, keyed_server.base_url + path, json=body, headers=headers)
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"


def test_anthropic_route_answers_in_anthropic_shape(keyed_server: ServerProcess) -> None:
    r = httpx.post(
        f"{keyed_server.base_url}/v1/messages", json=MESSAGES, headers={"x-api-key": "no"}
    )
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }


def test_right_key_either_header(keyed_server: ServerProcess) -> None:
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        r = httpx.post(
            f"{keyed_server.base_url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60
        )
        assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key=KEY)
    try:
        assert client.models.list().data[0].id == "tiny-llama"
    finally:
        client.close()
    bad = openai.OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key="nope", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    finally:
        bad.close()


@pytest.mark.slow  # starts a process
def test_rate_limit_gives_429_with_retry_after(tiny_dir: Path, tmp_path: Path) -> None:
    with run_server(
        ["--model", str(tiny_dir), "--rate-limit", "3"], log_path=tmp_path / "log"
    ) as s:
        with httpx.Client(base_url=s.base_url) as client:
            codes = [client.get("/v1/models").status_code for _ in range(3)]
            assert codes == [200, 200, 200]
            r = client.get("/v1/models")
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            r = client.post("/v1/messages", json=MESSAGES)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            # Another client (by API key) has its own budget; /health is never limited.
            assert client.get("/v1/models", headers={"x-api-key": "other"}).status_code == 200
            assert client.get("/health").status_code == 200


def test_rate_limiter_refills_over_time() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.take("a") == 0 for _ in range(60))
    wait = limiter.take("a")
    assert wait == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.take("a") == 0
    assert limiter.take("b") == 0  # clients are independent
