"""What became of each request: the one record behind the access log and the trace recorder.

An `Outcome` is created for every request before anything else looks at it (so even a request
that access control or CORS answers early has one), and lives in quart's `g`:

- Its id is the client's `x-request-id` when that is a sane token (printable ASCII, at most 128
  characters), else a new `req_<hex>`; every response carries it back in `x-request-id`, errors
  included (Anthropic routes also send it as `request-id`).
- Generation routes pass their event stream through `Outcome.observe`, which notes the time of
  the first generated text (time to first token, from the request's arrival), the text itself
  (only while recording a trace), each choice's finish reason, token counts and failures, as
  the renderer reads them: no renderer needs to know it is being watched.
- It ends once: in `after_request` for a whole response; when the body has been sent (however
  that ends: finished, failed, or the client went away) for a streamed one; in
  `teardown_request` when the handler never produced a response (the client left while a
  non-streamed request was generating: status 499, finish reason `disconnected`).
- Ending it writes one access-log line on the `mlx_server.access` logger (key=value pairs:
  request_id, method, endpoint, status, stream, prompt_tokens, completion_tokens, cached_tokens,
  ttft_ms, duration_ms, prompt_tps, gen_tps, finish_reason, and error when there was one; `-` for
  unknown) and, with `--record-trace`, queues the request's trace line. `/health` and `/metrics`
  log at debug level.
- `timings` (the same clock) gives the figures of the opt-in `timings` object of a response and of
  the access log's `prompt_tps` / `gen_tps`: the prompt phase runs from the request's arrival to
  its first generated piece (text, reasoning or a tool call), the generation phase from there to
  the end; prompt tokens/s counts the tokens processed (not served from the prompt cache), and
  generation tokens/s the tokens after the first (the first one ends the prompt phase).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import attrs
from quart import Quart, Response, g, request
from quart.wrappers.response import IterableBody, ResponseBody

from ..messages import (
    Failed,
    Finished,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallStart,
    Usage,
)
from ..replay.record import TraceRecorder, redact_headers

access_log = logging.getLogger("mlx_server.access")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_QUIET_PATHS = frozenset({"/health", "/metrics"})
_G_KEY = "mlx_server_outcome"
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the response"

T = TypeVar("T", StreamEvent, tuple[int, StreamEvent])


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def _per_second(count: int, seconds: float) -> float | None:
    return round(count / seconds, 2) if count > 0 and seconds > 0 else None


def timings(
    usage: Usage, *, arrived: float, first_token_at: float | None, ended: float
) -> dict[str, Any]:
    """A request's speed, in llama.cpp's `timings` names (and TTFT): the prompt phase is arrival
    to the first generated piece, the generation phase the rest (see the module docstring)."""
    first = first_token_at if first_token_at is not None else ended
    prompt_s = max(0.0, first - arrived)
    gen_s = max(0.0, ended - first)
    processed = max(0, usage.prompt_tokens - usage.cached_tokens)
    generated = usage.completion_tokens
    return {
        "prompt_n": processed,
        "prompt_ms": round(prompt_s * 1000, 3),
        "prompt_per_token_ms": round(prompt_s * 1000 / processed, 3) if processed else None,
        "prompt_per_second": _per_second(processed, prompt_s),
        "predicted_n": generated,
        "predicted_ms": round(gen_s * 1000, 3),
        "predicted_per_token_ms": (
            round(gen_s * 1000 / (generated - 1), 3) if generated > 1 else None
        ),
        "predicted_per_second": _per_second(generated - 1, gen_s),
        "cache_n": usage.cached_tokens,
        "prompt_tokens": usage.prompt_tokens,
        "ttft_ms": round(prompt_s * 1000, 1) if first_token_at is not None else None,
    }


@attrs.define(eq=False)
class Outcome:
    """One request, from arrival to the end of its response."""

    request_id: str
    method: str
    endpoint: str
    arrived: float = attrs.field(factory=time.monotonic)
    arrived_wall: float = attrs.field(factory=time.time)
    keep_text: bool = False
    status: int | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    first_token_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    finish_reasons: dict[int, str] = attrs.field(factory=dict)
    texts: dict[int, list[str]] = attrs.field(factory=dict)
    trace_request: dict[str, Any] | None = None  # the request part of a trace line
    responded: bool = False  # after_request has seen the response
    on_end: Callable[[Outcome], None] | None = None
    _per_prompt: int = 1
    _usage_seen: dict[int, tuple[int, int, int]] = attrs.field(factory=dict)

    # -- what generation routes call --------------------------------------------------------

    def observe(
        self,
        events: AsyncIterator[T],
        *,
        prompt_tokens: int | None = None,
        choices_per_prompt: int = 1,
        prefixes: Sequence[str] = (),
    ) -> AsyncIterator[T]:
        """`events`, watched: pass what a renderer reads through this. `prompt_tokens` is the
        request's prompt size when the route knows it (several prompts: their sum);
        `choices_per_prompt` (`n`) tells which choices share a prompt; `prefixes` is text a
        choice's response starts with that the engine did not generate (completions' echo)."""
        if prompt_tokens is not None:
            self.prompt_tokens = prompt_tokens
        self._per_prompt = max(1, choices_per_prompt)
        if self.keep_text:
            for index, prefix in enumerate(prefixes):
                if prefix:
                    self.texts.setdefault(index, []).append(prefix)
        return _Observed(events, self)

    def saw(self, index: int, event: StreamEvent) -> None:
        if isinstance(event, TextDelta):
            if event.text:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if self.keep_text:
                    self.texts.setdefault(index, []).append(event.text)
        elif isinstance(event, ReasoningDelta | ToolCallStart):
            if self.first_token_at is None:  # the answer began, as reasoning or a tool call
                self.first_token_at = time.monotonic()
        elif isinstance(event, Finished):
            if index not in self.finish_reasons:
                self.finish_reasons[index] = event.finish_reason
                u = event.usage
                self._usage_seen[index] = (u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        elif isinstance(event, Failed):
            if self.error is None:
                self.error = event.message

    # -- reading it ----------------------------------------------------------------------

    def _totals(self) -> None:
        if not self._usage_seen:
            return
        per = self._per_prompt
        firsts = [u for i, u in self._usage_seen.items() if i % per == 0]
        if self.prompt_tokens is None and firsts:
            self.prompt_tokens = sum(u[0] for u in firsts)
        self.cached_tokens = sum(u[2] for u in firsts) if firsts else None
        self.completion_tokens = sum(u[1] for u in self._usage_seen.values())

    @property
    def finish_reason(self) -> str | None:
        if self.error is not None:
            return "error"
        if self.finish_reasons:
            reasons = [self.finish_reasons[i] for i in sorted(self.finish_reasons)]
            return ",".join(dict.fromkeys(reasons))
        if self.status == CLIENT_CLOSED or (self.stream and self.prompt_tokens is not None):
            return "disconnected"  # it was generating when the response ended
        return None

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return round((self.first_token_at - self.arrived) * 1000, 1)

    @property
    def duration_ms(self) -> float | None:
        if self.ended_at is None:
            return None
        return round((self.ended_at - self.arrived) * 1000, 1)

    def timings(self, usage: Usage, *, now: float | None = None) -> dict[str, Any]:
        """The `timings` object of a response whose usage is `usage`, at `now` (default: now)."""
        ended = now if now is not None else (self.ended_at or time.monotonic())
        return timings(usage, arrived=self.arrived, first_token_at=self.first_token_at, ended=ended)

    def _rates(self) -> tuple[float | None, float | None]:
        """(prompt tokens/s, generation tokens/s) once ended with its token counts known."""
        if self.ended_at is None or self.prompt_tokens is None or self.completion_tokens is None:
            return None, None
        usage = Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens or 0,
        )
        t = self.timings(usage)
        return t["prompt_per_second"], t["predicted_per_second"]

    def output_texts(self) -> list[str]:
        if not self.texts:
            return []
        return ["".join(self.texts.get(i, ())) for i in range(max(self.texts) + 1)]

    def fields(self) -> dict[str, Any]:
        """The access-log fields, in order."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "endpoint": self.endpoint,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_ms": self.ttft_ms,
            "duration_ms": self.duration_ms,
        }
        out["prompt_tps"], out["gen_tps"] = self._rates()
        out["finish_reason"] = self.finish_reason
        if self.error is not None:
            out["error"] = self.error
        return out

    def trace_line(self, recorder: TraceRecorder) -> dict[str, Any]:
        assert self.trace_request is not None
        result = self.fields()
        for key in ("request_id", "method", "endpoint", "error"):
            result.pop(key, None)
        if self.error is not None:
            result["error"] = self.error
        result["texts"] = self.output_texts()
        return {
            "request_id": self.request_id,
            "ts": round(self.arrived_wall, 3),
            "offset": recorder.offset(self.arrived),
            **self.trace_request,
            "outcome": result,
        }

    # -- ending ----------------------------------------------------------------------------

    def end(self) -> None:
        """Finalise (once): stamp the duration, then log and record."""
        if self.ended_at is not None:
            return
        self.ended_at = time.monotonic()
        self._totals()
        if self.on_end is not None:
            self.on_end(self)


class _Observed(Generic[T]):
    """An async iterator that shows each item to the outcome before handing it on (a class,
    not an async generator: a renderer that stops early leaves nothing to finalise)."""

    def __init__(self, inner: AsyncIterator[T], outcome: Outcome) -> None:
        self._inner = inner
        self._outcome = outcome

    def __aiter__(self) -> _Observed[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._inner.__anext__()
        if isinstance(item, tuple):
            self._outcome.saw(item[0], item[1])
        else:
            self._outcome.saw(0, item)
        return item


class _EndingBody(ResponseBody):
    """A streamed body that ends its request's outcome once the body is done with, however
    that happens (the last chunk was sent, the generation failed, the client went away)."""

    def __init__(self, inner: ResponseBody, on_done: Callable[[], None]) -> None:
        self._inner = inner
        self._on_done = on_done

    async def __aenter__(self) -> Any:
        return await self._inner.__aenter__()

    async def __aexit__(self, exc_type: type, exc_value: BaseException, tb: TracebackType) -> None:
        try:
            await self._inner.__aexit__(exc_type, exc_value, tb)
        finally:
            self._on_done()


# -- logging --------------------------------------------------------------------------------


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def format_access_line(fields: dict[str, Any]) -> str:
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


def parse_access_line(line: str) -> dict[str, str]:
    """The key=value pairs of an access-log line (quoted values unquoted); for tests and tools."""
    pairs: dict[str, str] = {}
    for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        key, raw = match.group(1), match.group(2)
        pairs[key] = json.loads(raw) if raw.startswith('"') else raw
    return pairs


# -- the app hooks ------------------------------------------------------------------------


def current() -> Outcome:
    """The current request's outcome (routes call this to hook their event streams)."""
    outcome = g.get(_G_KEY)
    if outcome is None:
        outcome = _start()
    return outcome


def _start() -> Outcome:
    supplied = request.headers.get(REQUEST_ID_HEADER, "").strip()
    request_id = supplied if _CLIENT_ID.match(supplied) else new_request_id()
    outcome = Outcome(request_id=request_id, method=request.method, endpoint=request.path)
    setattr(g, _G_KEY, outcome)
    return outcome


def _recordable() -> bool:
    return request.path.startswith("/v1/") and request.method != "OPTIONS"


async def _trace_request() -> dict[str, Any]:
    part: dict[str, Any] = {"method": request.method, "endpoint": request.path}
    if request.query_string:
        part["query"] = request.query_string.decode("latin-1")
    part["headers"] = redact_headers(request.headers.items())
    try:
        data: bytes = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    except Exception as exc:  # too large (the route answers 413), or the client stopped sending
        part["body_error"] = type(exc).__name__
        return part
    if data:
        try:
            part["body"] = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            part["raw_body"] = data.decode("utf-8", errors="replace")
    return part


def install_outcomes(app: Quart, recorder: TraceRecorder | None) -> None:
    """Register the hooks. Call this before any other `before_request` hook is registered, so
    requests that another hook answers early have an outcome too (and, since quart runs
    `after_request` hooks in reverse order, this one sees the final response)."""

    def finish(outcome: Outcome) -> None:
        level = logging.DEBUG if outcome.endpoint in _QUIET_PATHS else logging.INFO
        if access_log.isEnabledFor(level):
            access_log.log(level, "%s", format_access_line(outcome.fields()))
        if recorder is not None and outcome.trace_request is not None:
            recorder.record(outcome.trace_line(recorder))

    @app.before_request
    async def _arrive() -> None:
        outcome = current()
        outcome.on_end = finish
        if recorder is not None and _recordable():
            outcome.keep_text = True
            # Read now (the route reads the same cached bytes), so that a request whose client
            # leaves before the response still has its trace line.
            outcome.trace_request = await _trace_request()

    @app.after_request
    async def _respond(response: Response) -> Response:
        outcome = current()
        outcome.on_end = finish
        outcome.responded = True
        outcome.status = response.status_code
        response.headers[REQUEST_ID_HEADER] = outcome.request_id
        body = response.response
        if isinstance(body, IterableBody):
            outcome.stream = True
            response.response = _EndingBody(body, outcome.end)
        else:
            outcome.end()
        return response

    @app.teardown_request
    async def _gone(_exc: BaseException | None) -> None:
        # No checkpoints here: this may run inside a cancelled scope (the client went away).
        outcome = g.get(_G_KEY)
        if outcome is not None and not outcome.responded:
            outcome.on_end = finish
            outcome.status = CLIENT_CLOSED
            outcome.end()

    if recorder is not None:

        @app.before_serving
        async def _start_writer() -> None:
            await app.nursery.start(recorder.serve_writer)  # type: ignore[attr-defined]

        @app.after_serving
        async def _stop_writer() -> None:
            recorder.close()
