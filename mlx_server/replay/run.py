"""Re-sending a trace: scheduling, reading the responses, timing them, and comparing outputs."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .http import BaseURL, HTTPError, open_request
from .trace import TraceEntry, arrival_schedule

_OPENAI_STREAMS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Headers of the recorded request that are sent again (credentials come from --api-key).
_RESENT_HEADERS = ("content-type", "accept", "anthropic-version", "anthropic-beta")


@attrs.frozen(kw_only=True)
class Options:
    speed: float = 1.0
    max_rate: bool = False
    concurrency: int | None = None
    stream: bool = False  # send every generation request streamed
    api_key: str | None = None
    timeout: float = 600.0


@attrs.define(eq=False)
class Result:
    """What one re-sent request got back."""

    entry: TraceEntry
    scheduled: float = 0.0  # seconds from the replay's start
    sent: float = 0.0
    ended: float = 0.0
    status: int | None = None
    error: str | None = None  # transport failure, timeout, or the in-band/HTTP error message
    texts: dict[int, list[str]] = attrs.field(factory=dict)
    first_text: float | None = None
    text_times: list[float] = attrs.field(factory=list)
    completion_tokens: int | None = None
    mismatch: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.sent

    @property
    def gaps(self) -> list[float]:
        t = self.text_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tokens(self) -> int:
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.text_times)

    def output_texts(self) -> list[str]:
        if not self.texts:
            return []
        return ["".join(self.texts.get(i, ())) for i in range(max(self.texts) + 1)]

    def add_text(self, index: int, text: str, now: float, *, timed: bool = True) -> None:
        if not text:
            return
        self.texts.setdefault(index, []).append(text)
        if timed:
            if self.first_text is None:
                self.first_text = now
            self.text_times.append(now)


# -- requests --------------------------------------------------------------------------------


def request_body(entry: TraceEntry, options: Options) -> bytes:
    body = entry.body
    if isinstance(body, dict) and entry.generation:
        if options.stream and body.get("stream") is not True:
            body = {**body, "stream": True}
        if entry.endpoint in _OPENAI_STREAMS and body.get("stream") is True:
            stream_options = body.get("stream_options")
            if not isinstance(stream_options, dict) or "include_usage" not in stream_options:
                # Ask for the usage chunk, to count tokens exactly.
                extra = stream_options if isinstance(stream_options, dict) else {}
                body = {**body, "stream_options": {**extra, "include_usage": True}}
        return json.dumps(body, ensure_ascii=False).encode()
    return entry.body_bytes()


def request_headers(entry: TraceEntry, options: Options) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in entry.headers.items() if k in _RESENT_HEADERS]
    if entry.body is not None and not any(k == "content-type" for k, _ in headers):
        headers.append(("content-type", "application/json"))
    if options.api_key:
        secret = entry.secret_headers()
        if "x-api-key" in secret and "authorization" not in secret:
            headers.append(("x-api-key", options.api_key))
        else:
            headers.append(("authorization", f"Bearer {options.api_key}"))
    if entry.request_id:
        headers.append(("x-request-id", f"replay-{entry.request_id}"[:128]))
    return headers


def _error_message(obj: Any) -> str | None:
    """The message of an OpenAI (`{"error": {...}}`) or Anthropic (`{"type": "error", ...}`)
    error object, or None when `obj` is not one."""
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "error")
    if error is not None:
        return str(error)
    return None


class SSEParser:
    """Splits a byte stream into server-sent events: (event name, data) pairs."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self._buffer += data.replace(b"\r\n", b"\n")
        events: list[tuple[str, str]] = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            name, payload = "", []
            for line in block.decode("utf-8", errors="replace").split("\n"):
                if line.startswith(":"):
                    continue  # a comment (keepalive)
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    name = value
                elif field == "data":
                    payload.append(value)
            if payload:
                events.append((name, "\n".join(payload)))
        return events


def read_stream_event(endpoint: str, name: str, data: str, result: Result, now: float) -> None:
    if data == "[DONE]":
        return
    try:
        obj = json.loads(data)
    except ValueError:
        result.error = result.error or f"unparseable stream event: {data[:80]!r}"
        return
    message = _error_message(obj)
    if message is not None or name == "error":
        result.error = result.error or message or "error event"
        return
    if not isinstance(obj, dict):
        return
    if endpoint == "/v1/messages":
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":  # every text block is one answer
                result.add_text(0, str(delta.get("text", "")), now)
        elif kind == "message_delta":
            usage = obj.get("usage") or {}
            if isinstance(usage.get("output_tokens"), int):
                result.completion_tokens = usage["output_tokens"]
        return
    for choice in obj.get("choices") or ():
        index = int(choice.get("index", 0))
        if endpoint == "/v1/chat/completions":
            text = (choice.get("delta") or {}).get("content")
        else:
            text = choice.get("text")
        if isinstance(text, str):
            result.add_text(index, text, now)
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        result.completion_tokens = usage["completion_tokens"]


def read_whole_body(endpoint: str, raw: bytes, result: Result, now: float) -> None:
    try:
        obj = json.loads(raw) if raw else None
    except ValueError:
        obj = None
    if result.status is not None and not 200 <= result.status < 300:
        message = _error_message(obj)
        result.error = message or raw[:200].decode("utf-8", errors="replace") or "no body"
        return
    if not isinstance(obj, dict):
        return
    if endpoint == "/v1/messages":
        text = "".join(
            str(block.get("text", ""))
            for block in obj.get("content") or ()
            if isinstance(block, dict) and block.get("type") == "text"
        )
        result.add_text(0, text, now, timed=False)
        usage = obj.get("usage") or {}
        if isinstance(usage.get("output_tokens"), int):
            result.completion_tokens = usage["output_tokens"]
        return
    if endpoint in _OPENAI_STREAMS:
        for choice in obj.get("choices") or ():
            index = int(choice.get("index", 0))
            if endpoint == "/v1/chat/completions":
                text = (choice.get("message") or {}).get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str):
                result.texts.setdefault(index, []).append(text)
        usage = obj.get("usage") or {}
        if isinstance(usage.get("completion_tokens"), int):
            result.completion_tokens = usage["completion_tokens"]


async def send_one(base: BaseURL, entry: TraceEntry, options: Options, result: Result) -> None:
    target = entry.endpoint + (f"?{entry.query}" if entry.query else "")
    result.sent = trio.current_time()
    with trio.move_on_after(options.timeout) as scope:
        try:
            async with open_request(
                base,
                entry.method,
                target,
                headers=request_headers(entry, options),
                body=request_body(entry, options),
            ) as response:
                result.status = response.status
                ctype = response.header("content-type") or ""
                if "text/event-stream" in ctype:
                    parser = SSEParser()
                    async for chunk in response.chunks():
                        now = trio.current_time()
                        for name, data in parser.feed(chunk):
                            read_stream_event(entry.endpoint, name, data, result, now)
                else:
                    raw = await response.read()
                    read_whole_body(entry.endpoint, raw, result, trio.current_time())
        except HTTPError as exc:
            result.error = str(exc)
    if scope.cancelled_caught:
        result.error = f"no complete response after {options.timeout:g} s"
    result.ended = trio.current_time()


# -- comparing ---------------------------------------------------------------------------------


def _snippet(text: str, at: int, width: int = 24) -> str:
    start = max(0, at - width)
    return (
        ("..." if start else "")
        + text[start : at + width]
        + ("..." if at + width < len(text) else "")
    )


def compare(entry: TraceEntry, result: Result) -> str | None:
    """Why the replayed output differs from the recorded one, or None when it matches."""
    want = entry.recorded_texts
    assert want is not None and entry.outcome is not None
    if result.status != entry.outcome.get("status"):
        got = result.status if result.status is not None else "no response"
        extra = f" ({result.error})" if result.error else ""
        return f"status {got}{extra}, recorded {entry.outcome.get('status')}"
    if result.error:
        return f"failed: {result.error}"
    got = result.output_texts()
    if len(got) != len(want):
        return f"{len(got)} choices, recorded {len(want)}"
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            at = min(len(a), len(b)) if at is None else at
            return (
                f"choice {i} differs at character {at}: recorded {_snippet(a, at)!r}, "
                f"replayed {_snippet(b, at)!r}"
            )
    return None


# -- the run -----------------------------------------------------------------------------------


async def replay(
    base: BaseURL,
    entries: Sequence[TraceEntry],
    options: Options,
    *,
    compare_outputs: bool = False,
    on_result: Callable[[Result, int, int], None] | None = None,
) -> tuple[list[Result], float]:
    """Send every entry at its scheduled time (scaled by `speed`; all at once with
    `max_rate`), at most `concurrency` at a time; return the results in schedule order and
    the wall time the replay took."""
    schedule = arrival_schedule(entries)
    limiter = trio.CapacityLimiter(options.concurrency) if options.concurrency else None
    results = [Result(entry=e, scheduled=t) for t, e in schedule]
    done = 0
    start = trio.current_time()

    async def run(result: Result) -> None:
        nonlocal done
        if limiter is not None:
            async with limiter:
                await send_one(base, result.entry, options, result)
        else:
            await send_one(base, result.entry, options, result)
        if compare_outputs and result.entry.comparable:
            result.mismatch = compare(result.entry, result)
        done += 1
        if on_result is not None:
            on_result(result, done, len(results))

    async with trio.open_nursery() as nursery:
        for result in results:
            if not options.max_rate:
                await trio.sleep_until(start + result.scheduled / options.speed)
            if options.max_rate:
                result.scheduled = 0.0
            else:
                result.scheduled /= options.speed
            nursery.start_soon(run, result)
            await trio.lowlevel.checkpoint()
    for result in results:  # times relative to the start
        result.sent -= start
        result.ended -= start
        if result.first_text is not None:
            result.first_text -= start
        result.text_times = [t - start for t in result.text_times]
    return results, trio.current_time() - start


# -- the summary -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: Sequence[Result], wall: float, *, compared: bool = False) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status is not None else "no response"
        statuses[key] = statuses.get(key, 0) + 1
        if not r.ok:
            label = key if r.status is None or not 200 <= r.status < 300 else f"{key} (in-band)"
            errors[label] = errors.get(label, 0) + 1
    ttfts = [r.ttft for r in results if r.ok and r.ttft is not None]
    gaps = [g for r in results if r.ok for g in r.gaps]
    tokens = sum(r.tokens for r in results if r.ok and r.entry.generation)
    lags = [max(0.0, r.sent - r.scheduled) for r in results]
    checked = [r for r in results if r.entry.comparable] if compared else []
    mismatches = [r for r in checked if r.mismatch is not None]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "requests": len(results),
        "wall_s": round(wall, 3),
        "statuses": statuses,
        "errors": errors,
        "ttft_ms": {
            "p50": ms(percentile(ttfts, 0.5)),
            "p95": ms(percentile(ttfts, 0.95)),
            "n": len(ttfts),
        },
        "itl_ms": {
            "p50": ms(percentile(gaps, 0.5)),
            "p95": ms(percentile(gaps, 0.95)),
            "n": len(gaps),
        },
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "max_send_lag_ms": ms(max(lags)) if lags else None,
        "compared": len(checked),
        "mismatches": [
            {
                "line": r.entry.line,
                "request_id": r.entry.request_id,
                "endpoint": r.entry.endpoint,
                "why": r.mismatch,
            }
            for r in mismatches
        ],
    }
