"""Per-request timings: the opt-in `timings` object of chat and completion responses (whole, and
on a stream's last chunk), and the same figures in the access log (`prompt_tps`, `gen_tps`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mlx_server.api.outcome import parse_access_line, timings
from mlx_server.messages import Usage
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

FIELDS = {
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
    "cache_n",
    "prompt_tokens",
    "ttft_ms",
}


def test_timings_figures() -> None:
    usage = Usage(prompt_tokens=120, completion_tokens=11, cached_tokens=20)
    t = timings(usage, arrived=10.0, first_token_at=10.5, ended=11.5)
    assert set(t) == FIELDS
    assert t["prompt_n"] == 100 and t["cache_n"] == 20 and t["prompt_tokens"] == 120
    assert t["prompt_ms"] == 500.0 and t["ttft_ms"] == 500.0
    assert t["prompt_per_second"] == 200.0 and t["prompt_per_token_ms"] == 5.0
    # Ten tokens after the first, in one second.
    assert t["predicted_n"] == 11 and t["predicted_ms"] == 1000.0
    assert t["predicted_per_second"] == 10.0 and t["predicted_per_token_ms"] == 100.0


def test_timings_without_a_generated_piece() -> None:
    usage = Usage(prompt_tokens=5, completion_tokens=0)
    t = timings(usage, arrived=1.0, first_token_at=None, ended=1.25)
    assert t["ttft_ms"] is None and t["prompt_ms"] == 250.0 and t["prompt_per_second"] == 20.0
    assert t["predicted_ms"] == 0.0 and t["predicted_per_second"] is None
    one = timings(Usage(prompt_tokens=5, completion_tokens=1), arrived=0, first_token_at=1, ended=1)
    assert one["predicted_per_second"] is None and one["predicted_per_token_ms"] is None


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("timings")
    build_tiny_model(root / "tiny")
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    with run_server(["--model", str(root / "tiny")], env=env, log_path=root / "log") as srv:
        yield srv


def check(t: dict[str, Any], usage: dict[str, Any]) -> None:
    assert set(t) == FIELDS
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert t["prompt_tokens"] == usage["prompt_tokens"] and t["cache_n"] == cached
    assert t["prompt_n"] == usage["prompt_tokens"] - cached
    assert t["predicted_n"] == usage["completion_tokens"]
    assert t["ttft_ms"] is not None and t["ttft_ms"] > 0 and t["prompt_ms"] > 0
    assert t["predicted_per_second"] is not None and t["predicted_per_second"] > 0
    assert t["prompt_per_second"] is not None and t["prompt_per_second"] > 0


def stream_chunks(server: ServerProcess, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


CHAT = {
    "messages": [{"role": "user", "content": "Count to ten, please."}],
    "max_tokens": 8,
    "ignore_eos": True,
}


def test_chat_timings_whole_and_streamed(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    plain = httpx.post(url, json=CHAT, timeout=60).json()
    assert "timings" not in plain  # opt-in
    whole = httpx.post(url, json={**CHAT, "timings": True}, timeout=60).json()
    check(whole["timings"], whole["usage"])
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt again

    chunks = stream_chunks(
        server, "/v1/chat/completions", {**CHAT, "stream": True, "timings": True}
    )
    assert [("timings" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["timings"]["predicted_n"] == 8 and last["timings"]["ttft_ms"] > 0

    with_usage = {
        **CHAT,
        "stream": True,
        "timings": True,
        "stream_options": {"include_usage": True},
    }
    chunks = stream_chunks(server, "/v1/chat/completions", with_usage)
    assert [("timings" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"] == []
    check(chunks[-1]["timings"], chunks[-1]["usage"])


def test_completion_timings(server: ServerProcess) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True, "timings": True}
    whole = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    check(whole["timings"], whole["usage"])
    chunks = stream_chunks(server, "/v1/completions", {**body, "stream": True})
    assert "timings" in chunks[-1] and not any("timings" in c for c in chunks[:-1])
    assert chunks[-1]["timings"]["predicted_n"] == 6


def test_timings_must_be_a_boolean(server: ServerProcess) -> None:
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={**CHAT, "timings": "yes"}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "timings"


def test_access_log_has_the_rates(server: ServerProcess) -> None:
    request_id = "timings-access-log-check"
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json=CHAT,
        headers={"x-request-id": request_id},
        timeout=60,
    )
    assert r.status_code == 200
    line = next((ln for ln in server.log().splitlines() if f"request_id={request_id}" in ln), None)
    assert line is not None
    fields = parse_access_line(line)
    assert float(fields["prompt_tps"]) > 0 and float(fields["gen_tps"]) > 0
    keys = list(fields)
    assert keys.index("duration_ms") < keys.index("prompt_tps") < keys.index("finish_reason")
