"""The Responses API's renderer for `api.run`: a response object (whole) or its SSE events
(streamed), both from one `ResponseWriter`, and the finished response handed to the store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import attrs

from ...actors.frontend import Frontend
from ...generation import Prepared, Tally
from ...generation.accumulate import NO_RESULT
from ...messages import (
    Failed,
    Finished,
    Heartbeat,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)
from .. import sse
from .events import Event, ResponseWriter, usage_body


def usage_json(usage: Usage) -> dict[str, Any]:
    return usage_body(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, 0)


@attrs.define
class ResponsesRender:
    """`custom_call`: the name of a forced custom tool whose grammar constrained the whole
    generation; its text becomes that tool call's input. `on_done` receives the final
    response object (for `store`)."""

    writer: ResponseWriter
    on_done: Callable[[dict[str, Any]], None]
    custom_call: str | None = None
    _custom_text: list[str] = attrs.field(factory=list)

    async def begin(self, model: Frontend, prepared: Prepared) -> None:
        self.writer.base = {**self.writer.base, "model": prepared.model_name}

    def prefixes(self) -> list[str]:
        return []

    def _events(self, ev: StreamEvent) -> Iterable[Event]:
        if self.custom_call is not None and isinstance(ev, TextDelta):
            self._custom_text.append(ev.text)
            return ()
        return self.writer.feed(ev)

    def _custom_close(self) -> Iterable[Event]:
        if self.custom_call is None:
            return
        arguments = json.dumps({"input": "".join(self._custom_text)}, ensure_ascii=False)
        yield from self.writer.feed(ToolCallStart(index=0, call_id="custom", name=self.custom_call))
        yield from self.writer.feed(ToolCallArgsDelta(index=0, arguments=arguments))

    def complete(self, prepared: Prepared, tally: Tally) -> dict[str, Any]:
        choice = tally.choices[0]
        assert choice.finished is not None
        replay: list[StreamEvent] = []
        if choice.reasoning:
            replay.append(ReasoningDelta(text=choice.reasoning))
        if choice.text:
            replay.append(TextDelta(text=choice.text))
        for i, call in enumerate(choice.tool_calls):
            replay.append(ToolCallStart(index=i, call_id=call.id, name=call.name))
            replay.append(ToolCallArgsDelta(index=i, arguments=call.arguments))
        for ev in replay:
            for _ in self._events(ev):
                pass
        for _ in self._custom_close():
            pass
        body = self.writer.final(choice.finished, usage=usage_json(tally.usage()))
        self.on_done(body)
        return body

    async def stream(
        self,
        prepared: Prepared,
        tally: Tally,
        events: AsyncIterator[tuple[int, StreamEvent]],
    ) -> AsyncIterator[bytes]:
        for event in self.writer.start():
            yield _frame(event)
        async for index, ev in events:
            if isinstance(ev, Heartbeat):
                yield sse.KEEPALIVE
                continue
            if isinstance(ev, Failed):
                final = list(self.writer.fail(ev))
                for event in final:
                    yield _frame(event)
                self.on_done(final[-1]["response"])
                return
            if isinstance(ev, Finished):
                tally.add(index, ev)
                closing = [*self._custom_close()]
                closing.extend(self.writer.finish(ev, usage=usage_json(tally.usage())))
                for event in closing:
                    yield _frame(event)
                self.on_done(closing[-1]["response"])
                return
            for event in self._events(ev):
                yield _frame(event)
        final = list(self.writer.fail(Failed(message=NO_RESULT)))
        for event in final:
            yield _frame(event)
        self.on_done(final[-1]["response"])


def _frame(event: Event) -> bytes:
    return sse.event(event["type"], event)
