"""Ollama's response shapes: NDJSON chunks for `/api/chat` and `/api/generate`, built from the
generation's stream events, with Ollama's durations (nanoseconds) and counts. Pure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import attrs

from ...messages import (
    Finished,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
)

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
    ends. `started` is when the request arrived (perf_counter), for the durations."""

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
            self.first_token_at = time.perf_counter()

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
        now = time.perf_counter()
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
