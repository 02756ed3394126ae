"""Ollama's response shapes: NDJSON chunks for `/api/chat` and `/api/generate`, built from the
generation's stream events, with Ollama's durations (nanoseconds) and counts.

`OllamaWriter` is pure (events in, chunks out); `OllamaRender` is the `api.run.Renderer` that
drives it for one request, timed from the request's arrival (its `Outcome`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import attrs

from ...actors.frontend import Frontend
from ...generation import Prepared, Tally
from ...generation.accumulate import NO_RESULT
from ...messages import (
    Failed,
    Finished,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
)
from ..outcome import Outcome
from ..outcome import current as outcome_of_request

Mode = Literal["chat", "generate"]


def timestamp(at: float | None = None) -> str:
    """RFC 3339 in UTC with nanoseconds, as Ollama writes `created_at`."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}000Z"


@attrs.define
class _Call:
    call_id: str
    name: str
    arguments: str = ""


@attrs.define
class OllamaWriter:
    """Stream events -> Ollama chunks. Text and thinking go out as they come; a tool call goes
    out whole (Ollama sends parsed argument objects) when the next call starts or the generation
    ends. `started` is when the request arrived (`time.monotonic`), for the durations."""

    model: str
    mode: Mode
    started: float
    first_token_at: float | None = None
    text: list[str] = attrs.field(factory=list)
    thinking: list[str] = attrs.field(factory=list)
    calls: list[_Call] = attrs.field(factory=list)
    _pending: _Call | None = None

    def _chunk(self, *, content: str = "", thinking: str = "", calls: Any = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.mode == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            chunk["message"] = message
        else:
            chunk["response"] = content
            if thinking:
                chunk["thinking"] = thinking
        chunk["done"] = False
        return chunk

    def _mark(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def feed(self, event: StreamEvent) -> Iterator[dict[str, Any]]:
        if isinstance(event, TextDelta) and event.text:
            self._mark()
            self.text.append(event.text)
            yield self._chunk(content=event.text)
        elif isinstance(event, ReasoningDelta) and event.text:
            self._mark()
            self.thinking.append(event.text)
            yield self._chunk(thinking=event.text)
        elif isinstance(event, ToolCallStart):
            self._mark()
            yield from self._flush()
            self._pending = _Call(call_id=event.call_id, name=event.name)
        elif isinstance(event, ToolCallArgsDelta) and self._pending is not None:
            self._pending.arguments += event.arguments

    def _flush(self) -> Iterator[dict[str, Any]]:
        call = self._pending
        if call is None:
            return
        self._pending = None
        self.calls.append(call)
        if self.mode == "chat":
            yield self._chunk(calls=[self._call_body(call, len(self.calls) - 1)])

    @staticmethod
    def _call_body(call: _Call, index: int) -> dict[str, Any]:
        try:
            arguments = json.loads(call.arguments) if call.arguments else {}
        except ValueError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {}
        return {
            "id": f"call_{call.call_id}",
            "function": {"index": index, "name": call.name, "arguments": arguments},
        }

    def finish(self, finished: Finished) -> Iterator[dict[str, Any]]:
        """Flush a pending call, then the closing chunk with `done: true`."""
        yield from self._flush()
        yield self.done(finished, whole=False)

    def done(self, finished: Finished, *, whole: bool) -> dict[str, Any]:
        """The closing chunk; `whole` puts the entire answer in it (a non-streaming reply)."""
        for _ in self._flush():
            pass
        now = time.monotonic()
        first = self.first_token_at if self.first_token_at is not None else now
        calls = [self._call_body(c, i) for i, c in enumerate(self.calls)] if whole else None
        chunk = self._chunk(
            content="".join(self.text) if whole else "",
            thinking="".join(self.thinking) if whole else "",
            calls=calls,
        )
        chunk["done"] = True
        chunk["done_reason"] = "length" if finished.finish_reason == "length" else "stop"
        usage = finished.usage
        chunk.update(
            total_duration=int((now - self.started) * 1e9),
            load_duration=0,
            prompt_eval_count=usage.prompt_tokens,
            prompt_eval_duration=int((first - self.started) * 1e9),
            eval_count=usage.completion_tokens,
            eval_duration=int((now - first) * 1e9),
        )
        return chunk


# -- the renderer of one request --------------------------------------------------------------


def ndjson(obj: Any) -> bytes:
    """One line of Ollama's streamed responses (`application/x-ndjson`)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@attrs.define
class OllamaRender:
    """`/api/chat` and `/api/generate` answers (one choice: Ollama has no `n`), streamed as
    NDJSON or whole; an error after the stream began is a last `{"error": ...}` line, which the
    Ollama clients raise. Durations run from the request's arrival; the first generated piece
    (text, thinking or a tool call) ends the prompt's evaluation."""

    mode: Mode
    _outcome: Outcome | None = None

    async def begin(self, model: Frontend, prepared: Prepared) -> None:
        self._outcome = outcome_of_request()

    def prefixes(self) -> list[str]:
        return []

    def _writer(self, prepared: Prepared) -> OllamaWriter:
        started = self._outcome.arrived if self._outcome is not None else time.monotonic()
        return OllamaWriter(model=prepared.model_name, mode=self.mode, started=started)

    def complete(self, prepared: Prepared, tally: Tally) -> dict[str, Any]:
        writer = self._writer(prepared)
        choice = tally.choices[0]
        assert choice.finished is not None
        writer.text = list(choice.texts)
        writer.thinking = list(choice.reasoning_parts)
        writer.calls = [
            _Call(call_id=c.id, name=c.name, arguments=c.arguments) for c in choice.tool_calls
        ]
        if self._outcome is not None:
            writer.first_token_at = self._outcome.first_token_at
        return writer.done(choice.finished, whole=True)

    async def stream(
        self, prepared: Prepared, tally: Tally, events: AsyncIterator[tuple[int, StreamEvent]]
    ) -> AsyncIterator[bytes]:
        writer = self._writer(prepared)
        async for index, ev in events:
            if isinstance(ev, Failed):
                yield ndjson({"error": ev.message})
                return
            finished = tally.add(index, ev)
            if isinstance(ev, Finished):
                if finished:
                    for chunk in writer.finish(ev):
                        yield ndjson(chunk)
                if tally.done:
                    return
            else:
                for chunk in writer.feed(ev):
                    yield ndjson(chunk)
        yield ndjson({"error": NO_RESULT})
