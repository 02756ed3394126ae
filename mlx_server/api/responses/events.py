"""The OpenAI Responses API's output, built from the generation's stream events.

One state machine serves both forms: fed the dialect-neutral events (`messages.StreamEvent`) it
keeps the response's `output` items and, for a stream, yields the Responses SSE events in the
order OpenAI sends them, each with its `sequence_number`:

    response.created, response.in_progress,
    per output item: response.output_item.added,
        reasoning: response.reasoning_text.delta ..., response.reasoning_text.done
        message:   response.content_part.added, output_text.delta ..., output_text.done,
                   response.content_part.done
        function:  function_call_arguments.delta ..., function_call_arguments.done
        custom:    custom_tool_call_input.delta, custom_tool_call_input.done
    response.output_item.done,
    response.completed | response.incomplete | response.failed

Items are opened lazily (the first delta of a kind opens its item) and closed when another kind
starts or the generation ends, so interleaved reasoning and text come out as separate items in
the order the model wrote them. Pure: no quart, no trio, no mlx.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import attrs

from ...messages import (
    Failed,
    Finished,
    Heartbeat,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
)

Event = dict[str, Any]
ToolKind = Literal["function", "custom"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@attrs.frozen(kw_only=True)
class ToolRef:
    """What a tool name the model sees stands for in the Responses API: a function (possibly
    inside a `namespace` tool) or a free-form `custom` tool whose input travels as the single
    string argument `input`."""

    kind: ToolKind
    name: str
    namespace: str | None = None


@attrs.define
class _Item:
    kind: Literal["reasoning", "message", "function_call", "custom_tool_call"]
    item_id: str
    output_index: int
    text: str = ""
    call_id: str = ""
    name: str = ""
    namespace: str | None = None
    tool_index: int = -1


@attrs.define
class ResponseWriter:
    """Turns stream events into Responses output items and (for streams) SSE events.

    `base` is the response object's request-derived fields (model, tools, instructions, ...);
    `tools` maps the names the model calls to what they stand for (names not in it are reported
    as plain function calls)."""

    response_id: str
    base: Mapping[str, Any]
    tools: Mapping[str, ToolRef] = attrs.field(factory=dict)
    # Set when the client asked for `reasoning.encrypted_content`: seals a reasoning text.
    encrypt: Callable[[str], str] | None = None
    created_at: int = attrs.field(factory=lambda: int(time.time()))
    output: list[dict[str, Any]] = attrs.field(factory=list)
    _sequence: int = 0
    _open: _Item | None = None
    _calls: dict[int, _Item] = attrs.field(factory=dict)

    # -- the response object -------------------------------------------------------------------

    def response(
        self,
        status: str,
        *,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        incomplete_reason: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": (
                {"reason": incomplete_reason} if incomplete_reason is not None else None
            ),
            **self.base,
            "output": [dict(item) for item in self.output],
            "usage": usage,
        }
        if status == "completed":
            body["completed_at"] = int(time.time())
        return body

    # -- events --------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> Iterator[Event]:
        """The two events every stream begins with."""
        yield self._event("response.created", response=self.response("in_progress"))
        yield self._event("response.in_progress", response=self.response("in_progress"))

    def feed(self, event: StreamEvent) -> Iterator[Event]:
        """Take one generation event; yield the SSE events it causes (ignore them for a
        non-streaming response: the items are kept either way)."""
        if isinstance(event, TextDelta):
            if event.text:
                yield from self._delta("message", event.text)
        elif isinstance(event, ReasoningDelta):
            if event.text:
                yield from self._delta("reasoning", event.text)
        elif isinstance(event, ToolCallStart):
            yield from self._start_call(event)
        elif isinstance(event, ToolCallArgsDelta):
            yield from self._call_delta(event)
        elif isinstance(event, Heartbeat):
            return
        elif isinstance(event, Finished | Failed):  # pragma: no branch
            # Endings go through `finish`/`fail`, which know the usage.
            return

    def finish(self, finished: Finished, *, usage: dict[str, Any]) -> Iterator[Event]:
        """Close what is open and yield the final event: completed, or incomplete when the
        output token limit cut the generation."""
        cut = finished.finish_reason == "length"
        yield from self._close(status="incomplete" if cut else "completed")
        if cut:
            body = self.response("incomplete", usage=usage, incomplete_reason="max_output_tokens")
            yield self._event("response.incomplete", response=body)
        else:
            yield self._event(
                "response.completed", response=self.response("completed", usage=usage)
            )

    def fail(self, failed: Failed, *, usage: dict[str, Any] | None = None) -> Iterator[Event]:
        """Close what is open and yield `response.failed` with the error."""
        yield from self._close(status="incomplete")
        code = "rate_limit_exceeded" if failed.status == 429 else "server_error"
        body = self.response("failed", usage=usage, error={"code": code, "message": failed.message})
        yield self._event("response.failed", response=body)

    def final(self, finished: Finished, *, usage: dict[str, Any]) -> dict[str, Any]:
        """The non-streaming body after the last event."""
        cut = finished.finish_reason == "length"
        for _ in self._close(status="incomplete" if cut else "completed"):
            pass
        if cut:
            return self.response("incomplete", usage=usage, incomplete_reason="max_output_tokens")
        return self.response("completed", usage=usage)

    # -- items ---------------------------------------------------------------------------------

    def _delta(self, kind: Literal["message", "reasoning"], text: str) -> Iterator[Event]:
        item = self._open
        if item is None or item.kind != kind:
            yield from self._close()
            item = yield from self._open_item(kind)
        item.text += text
        where = {"item_id": item.item_id, "output_index": item.output_index, "content_index": 0}
        if kind == "message":
            yield self._event("response.output_text.delta", **where, delta=text, logprobs=[])
        else:
            yield self._event("response.reasoning_text.delta", **where, delta=text)

    def _open_item(self, kind: Literal["message", "reasoning"]) -> Iterator[Event]:
        prefix = "msg" if kind == "message" else "rs"
        item = _Item(kind=kind, item_id=new_id(prefix), output_index=len(self.output))
        self._open = item
        self.output.append(self._item_body(item, "in_progress", empty=True))
        yield self._event(
            "response.output_item.added",
            output_index=item.output_index,
            item=self.output[item.output_index],
        )
        if kind == "message":
            yield self._event(
                "response.content_part.added",
                item_id=item.item_id,
                output_index=item.output_index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            )
        return item

    def _start_call(self, start: ToolCallStart) -> Iterator[Event]:
        yield from self._close()
        ref = self.tools.get(start.name, ToolRef(kind="function", name=start.name))
        kind: Literal["function_call", "custom_tool_call"] = (
            "custom_tool_call" if ref.kind == "custom" else "function_call"
        )
        item = _Item(
            kind=kind,
            item_id=new_id("ctc" if kind == "custom_tool_call" else "fc"),
            output_index=len(self.output),
            call_id=f"call_{start.call_id}",
            name=ref.name,
            namespace=ref.namespace,
            tool_index=start.index,
        )
        self._open = item
        self._calls[start.index] = item
        self.output.append(self._item_body(item, "in_progress", empty=True))
        yield self._event(
            "response.output_item.added",
            output_index=item.output_index,
            item=self.output[item.output_index],
        )

    def _call_delta(self, delta: ToolCallArgsDelta) -> Iterator[Event]:
        item = self._calls.get(delta.index)
        if item is None or not delta.arguments:
            return
        item.text += delta.arguments
        if item.kind == "function_call":
            yield self._event(
                "response.function_call_arguments.delta",
                item_id=item.item_id,
                output_index=item.output_index,
                delta=delta.arguments,
            )
        # A custom tool's input is the `input` string inside the JSON arguments: it is sent
        # whole when the call closes (one delta, then done).

    def _close(self, status: str = "completed") -> Iterator[Event]:
        item = self._open
        if item is None:
            return
        self._open = None
        where = {"item_id": item.item_id, "output_index": item.output_index}
        if item.kind == "message":
            yield self._event(
                "response.output_text.done", **where, content_index=0, text=item.text, logprobs=[]
            )
            yield self._event(
                "response.content_part.done",
                **where,
                content_index=0,
                part=_text_part(item.text),
            )
        elif item.kind == "reasoning":
            yield self._event(
                "response.reasoning_text.done", **where, content_index=0, text=item.text
            )
        elif item.kind == "function_call":
            yield self._event(
                "response.function_call_arguments.done", **where, arguments=item.text or "{}"
            )
        else:
            text = custom_input(item.text)
            if text:
                yield self._event("response.custom_tool_call_input.delta", **where, delta=text)
            yield self._event("response.custom_tool_call_input.done", **where, input=text)
        self.output[item.output_index] = self._item_body(item, status)
        yield self._event(
            "response.output_item.done",
            output_index=item.output_index,
            item=self.output[item.output_index],
        )

    def _item_body(self, item: _Item, status: str, *, empty: bool = False) -> dict[str, Any]:
        text = "" if empty else item.text
        if item.kind == "message":
            return {
                "id": item.item_id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [] if empty else [_text_part(text)],
            }
        if item.kind == "reasoning":
            body: dict[str, Any] = {
                "id": item.item_id,
                "type": "reasoning",
                "summary": [],
                "status": status,
            }
            if not empty:
                body["content"] = [{"type": "reasoning_text", "text": text}]
                if self.encrypt is not None:
                    body["encrypted_content"] = self.encrypt(text)
            return body
        if item.kind == "function_call":
            body = {
                "id": item.item_id,
                "type": "function_call",
                "status": status,
                "call_id": item.call_id,
                "name": item.name,
                "arguments": "" if empty else (text or "{}"),
            }
        else:
            body = {  # OpenAI's custom tool call item has no status
                "id": item.item_id,
                "type": "custom_tool_call",
                "call_id": item.call_id,
                "name": item.name,
                "input": "" if empty else custom_input(text),
            }
        if item.namespace is not None:
            body["namespace"] = item.namespace
        return body


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def custom_input(arguments: str) -> str:
    """A custom tool call's free-form input from the JSON arguments the model wrote
    (`{"input": "..."}`); arguments that are not such an object are passed on as they are."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments
    if isinstance(parsed, dict):
        value = parsed.get("input")
        if isinstance(value, str):
            return value
        if len(parsed) == 1:
            only = next(iter(parsed.values()))
            return only if isinstance(only, str) else json.dumps(only)
        return json.dumps(parsed) if parsed else ""
    return arguments if not isinstance(parsed, str) else parsed


def usage_body(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning: int
) -> dict[str, Any]:
    """Responses usage: input/output tokens with the cached and reasoning details."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt_tokens + completion_tokens,
    }
