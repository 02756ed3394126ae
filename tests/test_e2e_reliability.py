"""Reliability through the real server process on a tiny model: `/metrics`, a client that cuts
its stream, hard timeouts mid-stream, overload answers, CORS, the body-size limit, and the
`mlx_server_rejected_total` counts of each. Nothing here sleeps to wait: every wait polls with a
deadline."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_server.api.app import create_app
from mlx_server.api.state import ServerState
from mlx_server.config import Settings
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

KEY = "reliability-key"
GOOD_ORIGIN = "http://good.example"
BAD_ORIGIN = "http://evil.example"
BODY_LIMIT = 64 * 1024
TIMEOUT_S = 2
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# --------------------------------------------------------------------------- helpers


def clean_env() -> dict[str, str]:
    """Blank out the developer's own MLX_SERVER_* settings (an empty variable is unset)."""
    return {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> Samples:
    r = httpx.get(f"{base_url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rejected(samples: Samples, reason: str) -> float:
    return metric(samples, "mlx_server_rejected_total", reason=reason)


def poll(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def idle(server: ServerProcess) -> bool:
    s = scrape(server.base_url)
    return (
        metric(s, "mlx_server_requests_running") == 0
        and metric(s, "mlx_server_requests_waiting") == 0
    )


def chat(max_tokens: int, *, stream: bool = False, ignore_eos: bool = True) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": stream,
    }


def message(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def sse_data(lines: Iterator[str]) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def sse_events(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def limited(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tight limits: 2 s timeout, one running and one waiting request, 3 requests a minute per
    client, a 64 KiB body limit, CORS for one origin. Requests send a fresh `x-api-key` (no key
    is configured) so each has its own rate-limit bucket unless a test shares one on purpose."""
    args = [
        "--model", str(tiny_dir),
        "--timeout", str(TIMEOUT_S),
        "--max-batch-size", "1",
        "--max-queue", "1",
        "--rate-limit", "3",
        "--max-body-bytes", str(BODY_LIMIT),
        "--cors-origins", f"{GOOD_ORIGIN},http://other.example",
    ]  # fmt: skip
    log = tmp_path_factory.mktemp("limited") / "server.log"
    with run_server(args, env=clean_env(), log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """An API key, CORS for any origin, the default (long) timeout."""
    args = ["--model", str(tiny_dir), "--api-key", KEY, "--cors-origins", "*"]
    log = tmp_path_factory.mktemp("keyed") / "server.log"
    with run_server(args, env=clean_env(), log_path=log) as server:
        yield server


def fresh() -> dict[str, str]:
    return {"x-api-key": f"client-{uuid.uuid4().hex}"}


@pytest.fixture
def limited_http(limited: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.base_url, timeout=HTTP_TIMEOUT) as c:
        yield c


@pytest.fixture
def keyed_http(keyed: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed.base_url, timeout=HTTP_TIMEOUT, headers=headers) as c:
        yield c


# --------------------------------------------------------------------------- /metrics


def test_metrics_count_requests_tokens_and_ttft(
    keyed: ServerProcess, keyed_http: httpx.Client
) -> None:
    before = scrape(keyed.base_url)
    r = keyed_http.post("/v1/chat/completions", json=chat(7))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert keyed_http.get("/v1/models/tiny-llama").status_code == 200
    assert keyed_http.get("/no/such/route").status_code == 404
    after = scrape(keyed.base_url)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    endpoint = "/v1/chat/completions"
    assert delta("mlx_server_requests_total", endpoint=endpoint, status="200") == 1
    # The route's rule, not the raw path: bounded label values.
    assert delta("mlx_server_requests_total", endpoint="/v1/models/<path:model_id>", status="200")
    assert delta("mlx_server_requests_total", endpoint="unmatched", status="404") == 1
    assert delta("mlx_server_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("mlx_server_generation_tokens_total") == usage["completion_tokens"] == 7
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert delta("mlx_server_prompt_cache_hit_tokens_total") == cached
    assert delta("mlx_server_time_to_first_token_seconds_count") == 1
    assert delta("mlx_server_time_to_first_token_seconds_sum") > 0
    assert metric(after, "mlx_server_requests_running") == 0
    assert metric(after, "mlx_server_requests_waiting") == 0


def test_metrics_and_health_stay_open_with_an_api_key(keyed: ServerProcess) -> None:
    before = scrape(keyed.base_url)  # no key sent
    r = httpx.get(f"{keyed.base_url}/v1/models")
    assert r.status_code == 401
    r = httpx.post(f"{keyed.base_url}/v1/messages", json=message(2), headers={"x-api-key": "no"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert rejected(scrape(keyed.base_url), "auth") - rejected(before, "auth") == 2


def test_early_refusal_of_a_large_body_does_not_hang_the_connection(keyed: ServerProcess) -> None:
    """A 401 sent before a 60 KB body was read: the next request on the same client works."""
    big = {**chat(2), "messages": [{"role": "user", "content": "a" * 60_000}]}
    with httpx.Client(base_url=keyed.base_url, timeout=10) as client:
        for _ in range(5):
            r = client.post("/v1/chat/completions", json=big)
            assert r.status_code == 401
            r = client.get("/v1/models", headers={"x-api-key": KEY})
            assert r.status_code == 200


def test_cut_stream_leaves_the_batch_and_generation_stops(
    keyed: ServerProcess, keyed_http: httpx.Client
) -> None:
    base = keyed.base_url
    with keyed_http.stream("POST", "/v1/chat/completions", json=chat(100_000, stream=True)) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 5:
                assert metric(scrape(base), "mlx_server_requests_running") == 1
                break
    # The client is gone: the request must leave the executor...
    poll("requests_running back to 0", lambda: idle(keyed))
    # ...and the engine must stop generating for it. A 5-token request run now adds exactly
    # its own tokens; a request still generating in the background would add more.
    generated = metric(scrape(base), "mlx_server_generation_tokens_total")
    r = keyed_http.post("/v1/chat/completions", json=chat(5))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert metric(scrape(base), "mlx_server_generation_tokens_total") == generated + 5
    assert idle(keyed)


# --------------------------------------------------------------------------- hard timeouts


def test_timeout_mid_stream_openai(limited: ServerProcess, limited_http: httpx.Client) -> None:
    before = scrape(limited.base_url)
    started = time.monotonic()
    body = chat(100_000, stream=True)
    with limited_http.stream("POST", "/v1/chat/completions", json=body, headers=fresh()) as r:
        assert r.status_code == 200
        payloads = sse_data(r.iter_lines())
    assert time.monotonic() - started < TIMEOUT_S + 10
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "timeout_error" and "timed out" in error["message"]
    content = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[:-2]]
    assert any(content), "the timeout should cut a stream that has produced text"
    poll("the timed-out request to leave", lambda: idle(limited))
    assert rejected(scrape(limited.base_url), "timeout") - rejected(before, "timeout") == 1


def test_timeout_mid_stream_anthropic(limited: ServerProcess, limited_http: httpx.Client) -> None:
    before = scrape(limited.base_url)
    body = message(100_000, stream=True)
    # Anthropic's API has no ignore_eos; the tiny model's greedy answer to this prompt runs
    # past the timeout, but should a different tiny model pick EOS first, skip rather than fail.
    with limited_http.stream("POST", "/v1/messages", json=body, headers=fresh()) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    names = [n for n, _ in events]
    assert names[0] == "message_start"
    if names[-1] == "message_stop":
        pytest.skip("the model chose to stop before the timeout")
    assert names[-1] == "error", names
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": "timeout_error", "message": f"request timed out after {TIMEOUT_S} s"},
    }
    assert "content_block_delta" in names
    poll("the timed-out request to leave", lambda: idle(limited))
    assert rejected(scrape(limited.base_url), "timeout") - rejected(before, "timeout") == 1


def test_timeout_non_streaming_is_a_json_504(
    limited: ServerProcess, limited_http: httpx.Client
) -> None:
    before = scrape(limited.base_url)
    r = limited_http.post("/v1/chat/completions", json=chat(100_000), headers=fresh())
    assert r.status_code == 504
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "timeout_error"
    r = limited_http.post(
        "/v1/completions",
        json={"model": "tiny-llama", "prompt": "Once", "max_tokens": 100_000, "ignore_eos": True},
        headers=fresh(),
    )
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    poll("the timed-out requests to leave", lambda: idle(limited))
    assert rejected(scrape(limited.base_url), "timeout") - rejected(before, "timeout") == 2


# --------------------------------------------------------------------------- overload


def test_overload_answers_fast_in_each_shape(
    limited: ServerProcess, limited_http: httpx.Client
) -> None:
    """--max-batch-size 1 --max-queue 1: one request runs, one waits, the next is refused
    at once, never queued without bound."""
    before = scrape(limited.base_url)
    body = chat(100_000, stream=True)
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            r = stack.enter_context(
                limited_http.stream("POST", "/v1/chat/completions", json=body, headers=fresh())
            )
            assert r.status_code == 200
        s = scrape(limited.base_url)
        assert metric(s, "mlx_server_requests_running") == 1
        assert metric(s, "mlx_server_requests_waiting") == 1

        started = time.monotonic()
        r = limited_http.post("/v1/chat/completions", json=chat(10), headers=fresh())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "server_overloaded"
        r = limited_http.post("/v1/messages", json=message(10), headers=fresh())
        assert r.status_code == 529, r.text
        assert r.json() == {
            "type": "error",
            "error": {
                "type": "overloaded_error",
                "message": "the server is at capacity; retry later",
            },
        }
        assert time.monotonic() - started < 1.5, "an overload answer must not wait"
    poll("the cut requests to leave", lambda: idle(limited))
    after = scrape(limited.base_url)
    assert rejected(after, "overloaded") - rejected(before, "overloaded") == 2
    assert rejected(after, "rate_limit") == rejected(before, "rate_limit")


def test_rate_limit_is_counted_apart_from_overload(
    limited: ServerProcess, limited_http: httpx.Client
) -> None:
    before = scrape(limited.base_url)
    headers = fresh()
    codes = [limited_http.get("/v1/models", headers=headers).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    after = scrape(limited.base_url)
    assert rejected(after, "rate_limit") - rejected(before, "rate_limit") == 1
    assert rejected(after, "overloaded") == rejected(before, "overloaded")


# --------------------------------------------------------------------------- body size, invalid


@pytest.mark.parametrize("chunked", [False, True])
def test_too_large_body_is_a_json_413(
    limited: ServerProcess, limited_http: httpx.Client, chunked: bool
) -> None:
    before = scrape(limited.base_url)
    text = "a" * (BODY_LIMIT + 1)
    raw = json.dumps({**chat(2), "messages": [{"role": "user", "content": text}]}).encode()
    headers = {**fresh(), "content-type": "application/json"}
    content: bytes | Iterator[bytes] = iter([raw[:1000], raw[1000:]]) if chunked else raw
    r = limited_http.post("/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/json"
    # The body was not read: the connection must not be reused (see api/app.py).
    assert r.headers["connection"] == "close"
    assert r.json()["error"]["code"] == "request_too_large"

    content = iter([raw[:1000], raw[1000:]]) if chunked else raw
    r = limited_http.post("/v1/messages", content=content, headers=headers)
    assert r.status_code == 413
    assert r.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": "request body too large"},
    }
    after = scrape(limited.base_url)
    assert rejected(after, "too_large") - rejected(before, "too_large") == 2
    # A body just under the limit is read normally.
    r = limited_http.post("/v1/chat/completions", json=chat(2), headers=fresh())
    assert r.status_code == 200, r.text


def test_invalid_requests_are_counted(limited: ServerProcess, limited_http: httpx.Client) -> None:
    before = scrape(limited.base_url)
    r = limited_http.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={**fresh(), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = limited_http.post("/v1/messages", json={"model": "tiny-llama"}, headers=fresh())
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert rejected(scrape(limited.base_url), "invalid") - rejected(before, "invalid") == 2


# --------------------------------------------------------------------------- CORS


def preflight(origin: str, headers: str = "authorization, content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }


def test_cors_preflight_for_an_allowed_origin(limited_http: httpx.Client) -> None:
    for path in ("/v1/chat/completions", "/v1/messages"):
        r = limited_http.options(path, headers=preflight(GOOD_ORIGIN))
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == GOOD_ORIGIN
        assert "POST" in r.headers["access-control-allow-methods"]
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
        assert "Origin" in r.headers["vary"]
    # An SDK's own headers are allowed too.
    sdk = "x-api-key, anthropic-version, anthropic-dangerous-direct-browser-access"
    r = limited_http.options("/v1/messages", headers=preflight("http://other.example", sdk))
    assert r.headers["access-control-allow-origin"] == "http://other.example"
    assert "anthropic-version" in r.headers["access-control-allow-headers"]


def test_cors_denied_origin_gets_no_cors_headers(limited_http: httpx.Client) -> None:
    r = limited_http.options("/v1/chat/completions", headers=preflight(BAD_ORIGIN))
    assert not any(h.startswith("access-control-") for h in r.headers)
    r = limited_http.get("/v1/models", headers={**fresh(), "Origin": BAD_ORIGIN})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


def test_cors_headers_on_responses_and_errors(limited_http: httpx.Client) -> None:
    headers = {**fresh(), "Origin": GOOD_ORIGIN}
    r = limited_http.post("/v1/chat/completions", json=chat(2, stream=True), headers=headers)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == GOOD_ORIGIN
    r = limited_http.post("/v1/messages", json={}, headers=headers)
    assert r.status_code == 400
    assert r.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert "request-id" in r.headers["access-control-expose-headers"]


def test_cors_preflight_needs_no_key_and_errors_carry_cors(keyed: ServerProcess) -> None:
    r = httpx.options(f"{keyed.base_url}/v1/chat/completions", headers=preflight(BAD_ORIGIN))
    assert r.status_code == 200  # '*' allows every origin, and no key is needed
    assert r.headers["access-control-allow-origin"] == "*"
    r = httpx.get(f"{keyed.base_url}/v1/models", headers={"Origin": BAD_ORIGIN})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == "*"


async def test_no_cors_headers_without_the_flag() -> None:
    """CORS is off by default (in process: no model needed to see the headers)."""
    app = create_app(Settings(), ServerState())
    client = app.test_client()
    r = await client.options("/v1/chat/completions", headers=preflight(GOOD_ORIGIN))
    assert not any(h.lower().startswith("access-control-") for h in r.headers.keys())
    r = await client.get("/v1/models", headers={"Origin": GOOD_ORIGIN})
    assert r.status_code == 503  # still "loading": no frontend in this app
    assert "access-control-allow-origin" not in r.headers
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert "mlx_server_requests_running 0.0" in await r.get_data(as_text=True)
