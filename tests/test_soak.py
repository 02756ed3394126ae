"""Soak: 300 mixed requests at concurrency 16 against one tiny-model server, with clients that
disconnect mid-stream or mid-request and generations long enough to hit `--timeout`.

At the end nothing is running or waiting, every response that completed is well formed in its
API's shape, no unexpected 5xx came back, and the server's resident memory (VmRSS) grew by less
than `RSS_GROWTH_LIMIT` from after warm-up. The figures are printed at the end (`-s` shows them).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

pytestmark = pytest.mark.slow

REQUESTS = 300
WARMUP = 32
CONCURRENCY = 16
TIMEOUT_S = 3.0  # --timeout: the "long" requests below always run past it
RSS_GROWTH_LIMIT = 300 * 1024 * 1024
SEED = 20_261_126

KINDS = ("chat", "chat_stream", "messages", "messages_stream", "completion", "completion_stream")
PROMPTS = (
    "Tell me a story about a lighthouse keeper.",
    "What is the capital of France?",
    "Write a haiku about autumn rain.",
    "Explain recursion to a five year old.",
)


def clean_env() -> dict[str, str]:
    return {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(model)
    args = ["--model", str(model), "--timeout", str(TIMEOUT_S)]
    log = tmp_path_factory.mktemp("soak") / "server.log"
    with run_server(args, env=clean_env(), log_path=log) as s:
        yield s


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(base_url: str) -> Samples:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --------------------------------------------------------------------------- the requests


@attrs.frozen
class Plan:
    kind: str
    body: dict[str, Any]
    long: bool  # runs past --timeout unless cut first
    cut_after: int | None  # streams: disconnect after this many events
    give_up_after: float | None  # non-streams: disconnect after this many seconds


def make_plan(rng: random.Random) -> Plan:
    kind = rng.choice(KINDS)
    stream = kind.endswith("_stream")
    long = rng.random() < 0.12
    max_tokens = 5_000 if long else rng.randint(1, 16)
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        prompt += f" (variant {rng.randint(0, 10_000)})"
    body: dict[str, Any] = {
        "model": "tiny-llama",
        "max_tokens": max_tokens,
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "stream": stream,
    }
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": prompt}]
    elif kind.startswith("messages"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if long and not kind.startswith("messages"):
        body["ignore_eos"] = True  # Anthropic's API has no such field; long answers run anyway
    cut_after = give_up_after = None
    if rng.random() < 0.15:
        if stream:
            cut_after = rng.randint(1, 4)
        else:
            give_up_after = rng.uniform(0.05, 0.6)
    return Plan(kind, body, long, cut_after, give_up_after)


def path_of(kind: str) -> str:
    if kind.startswith("chat"):
        return "/v1/chat/completions"
    if kind.startswith("messages"):
        return "/v1/messages"
    return "/v1/completions"


@attrs.define
class Tally:
    sent: int = 0
    completed: int = 0
    disconnects: int = 0
    timeouts: int = 0
    statuses: Counter[int] = attrs.field(factory=Counter)
    problems: list[str] = attrs.field(factory=list)

    def problem(self, plan: Plan, what: str) -> None:
        self.problems.append(f"{plan.kind} {json.dumps(plan.body)[:120]}: {what}")


# --------------------------------------------------------------------------- shape checks


def check_whole(plan: Plan, status: int, body: Any, tally: Tally) -> None:
    anthropic = plan.kind.startswith("messages")
    if status == 504:
        kind = body["error"]["type"]
        if kind != "timeout_error" or (anthropic and body.get("type") != "error"):
            tally.problem(plan, f"bad 504 body {body}")
        tally.timeouts += 1
        return
    if status != 200:
        tally.problem(plan, f"status {status}: {body}")
        return
    limit = plan.body["max_tokens"]
    if anthropic:
        ok = (
            body["type"] == "message"
            and body["content"][0]["type"] == "text"
            and isinstance(body["content"][0]["text"], str)
            and body["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence")
            and 0 < body["usage"]["output_tokens"] <= limit
        )
    else:
        choice = body["choices"][0]
        text = choice["message"]["content"] if plan.kind == "chat" else choice["text"]
        ok = (
            body["object"] == ("chat.completion" if plan.kind == "chat" else "text_completion")
            and isinstance(text, str)
            and choice["finish_reason"] in ("stop", "length")
            and 0 < body["usage"]["completion_tokens"] <= limit
        )
    if not ok:
        tally.problem(plan, f"malformed response {body}")
    tally.completed += 1


def check_openai_stream(plan: Plan, payloads: list[str], tally: Tally) -> None:
    if not payloads or payloads[-1] != "[DONE]":
        tally.problem(plan, f"stream did not end with [DONE]: {payloads[-2:]}")
        return
    chunks = [json.loads(p) for p in payloads[:-1]]
    if chunks and "error" in chunks[-1]:
        if chunks[-1]["error"]["type"] != "timeout_error":
            tally.problem(plan, f"stream error {chunks[-1]}")
        tally.timeouts += 1
        chunks = chunks[:-1]
    else:
        tally.completed += 1
        if chunks[-1]["choices"][0]["finish_reason"] not in ("stop", "length"):
            tally.problem(plan, f"stream without a finish reason: {chunks[-1]}")
    expected = "chat.completion.chunk" if plan.kind == "chat_stream" else "text_completion"
    for chunk in chunks:
        if chunk.get("object") != expected or "error" in chunk:
            tally.problem(plan, f"malformed chunk {chunk}")


def check_anthropic_stream(
    plan: Plan, events: list[tuple[str, dict[str, Any]]], tally: Tally
) -> None:
    names = [n for n, _ in events]
    if not names or names[0] != "message_start":
        tally.problem(plan, f"stream did not start with message_start: {names[:3]}")
        return
    for name, data in events:
        if data.get("type") != name:
            tally.problem(plan, f"event {name} with data type {data.get('type')}")
    if names[-1] == "error":
        if events[-1][1]["error"]["type"] != "timeout_error":
            tally.problem(plan, f"stream error {events[-1][1]}")
        tally.timeouts += 1
    elif names[-3:] == ["content_block_stop", "message_delta", "message_stop"]:
        tally.completed += 1
    else:
        tally.problem(plan, f"stream ended with {names[-3:]}")


# --------------------------------------------------------------------------- the client


async def run_one(client: httpx.AsyncClient, plan: Plan, tally: Tally) -> None:
    tally.sent += 1
    path = path_of(plan.kind)
    if not plan.body["stream"]:
        timeout = httpx.Timeout(plan.give_up_after or 60.0, connect=10.0)
        try:
            r = await client.post(path, json=plan.body, timeout=timeout)
        except httpx.TimeoutException:
            if plan.give_up_after is None:
                tally.problem(plan, "no answer within 60 s")
            tally.disconnects += 1
            return
        tally.statuses[r.status_code] += 1
        check_whole(plan, r.status_code, r.json(), tally)
        return
    async with client.stream("POST", path, json=plan.body) as r:
        tally.statuses[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            tally.problem(plan, f"stream status {r.status_code}: {r.text}")
            return
        seen = 0
        name = ""
        payloads: list[str] = []
        events: list[tuple[str, dict[str, Any]]] = []
        lines = r.aiter_lines()
        try:
            async for line in lines:
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    payloads.append(line[6:])
                    if plan.kind == "messages_stream":
                        events.append((name, json.loads(line[6:])))
                    seen += 1
                    if plan.cut_after is not None and seen >= plan.cut_after:
                        tally.disconnects += 1
                        # Close the connection mid-stream, then let the reader fail on it, so
                        # httpx's generators end by that error instead of being abandoned.
                        await r.aclose()
                        async for _ in lines:
                            pass
                        return
        except httpx.HTTPError:
            if plan.cut_after is None or seen < plan.cut_after:
                raise
            return
    if plan.kind == "messages_stream":
        check_anthropic_stream(plan, events, tally)
    else:
        check_openai_stream(plan, payloads, tally)


async def run_all(base_url: str, plans: list[Plan], tally: Tally) -> None:
    send, receive = trio.open_memory_channel[Plan](len(plans))
    for plan in plans:
        send.send_nowait(plan)
    send.close()
    limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
    timeout = httpx.Timeout(60.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            async for plan in receive.clone():
                await run_one(client, plan, tally)

        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker)


async def wait_idle(base_url: str) -> None:
    """Poll until the server has nothing running or waiting (30 s at most)."""
    with trio.fail_after(30):
        while True:
            samples = await scrape(base_url)
            running = samples[("mlx_server_requests_running", frozenset())]
            waiting = samples[("mlx_server_requests_waiting", frozenset())]
            if running == 0 and waiting == 0:
                break
            await trio.sleep(0.1)
    async with httpx.AsyncClient(timeout=10) as client:
        health = (await client.get(f"{base_url}/health")).json()
    assert health["running"] == 0 and health["waiting"] == 0


async def test_soak(server: ServerProcess) -> None:
    rng = random.Random(SEED)
    warmup = Tally()
    await run_all(server.base_url, [make_plan(rng) for _ in range(WARMUP)], warmup)
    assert not warmup.problems, warmup.problems
    await wait_idle(server.base_url)
    rss_before = rss_bytes(server.process.pid)
    before = await scrape(server.base_url)

    plans = [make_plan(rng) for _ in range(REQUESTS)]
    tally = Tally()
    started = time.monotonic()
    await run_all(server.base_url, plans, tally)
    elapsed = time.monotonic() - started
    await wait_idle(server.base_url)
    rss_after = rss_bytes(server.process.pid)
    after = await scrape(server.base_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # Every request is in mlx_server_requests_total: 200 (streams however they ended, and
    # answers), 504, or 499 (a non-streamed request whose client left first).
    generation_routes = ("/v1/chat/completions", "/v1/messages", "/v1/completions")
    server_statuses: Counter[str] = Counter()
    for (name, labels), value in after.items():
        label = dict(labels)
        if name == "mlx_server_requests_total" and label["endpoint"] in generation_routes:
            server_statuses[label["status"]] += int(value - before.get((name, labels), 0.0))
    five_xx = sum(n for status, n in tally.statuses.items() if status >= 500)
    unexpected_5xx = five_xx - tally.statuses[504]
    server_timeouts = delta("mlx_server_rejected_total", reason="timeout")
    print(
        f"\nsoak: {tally.sent} requests in {elapsed:.1f} s at concurrency {CONCURRENCY}; "
        f"{tally.completed} completed, {tally.disconnects} client disconnects injected, "
        f"{tally.timeouts} timeouts seen by clients ({server_timeouts:.0f} counted by the server, "
        f"which also counts generations whose client had left); "
        f"statuses seen {dict(sorted(tally.statuses.items()))}, counted by the server "
        f"{dict(sorted(server_statuses.items()))}; 5xx seen {five_xx} "
        f"(all 504 timeouts: {unexpected_5xx == 0}); "
        f"generated {delta('mlx_server_generation_tokens_total'):.0f} tokens; "
        f"RSS {rss_before / 2**20:.1f} MiB after warm-up -> {rss_after / 2**20:.1f} MiB "
        f"(+{(rss_after - rss_before) / 2**20:.1f} MiB, limit +{RSS_GROWTH_LIMIT / 2**20:.0f})"
    )
    assert tally.sent == REQUESTS
    assert not tally.problems, "\n".join(tally.problems[:20])
    assert unexpected_5xx == 0
    assert tally.disconnects > 0 and tally.timeouts > 0, "the soak must inject both faults"
    assert tally.completed + tally.disconnects + tally.timeouts == REQUESTS
    assert server_timeouts >= tally.timeouts
    assert sum(server_statuses.values()) == REQUESTS
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
