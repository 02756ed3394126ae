"""Results and stream events in Anthropic's shapes: a message, or its event stream.

Usage, as Anthropic counts it: `cache_read_input_tokens` is the part of the prompt the prefix
cache served (the server's cache is automatic, `cache_control` or not) and `input_tokens` the
rest, so the two add up to the whole prompt, the number `count_tokens` returns. A stream's
`message_start` cannot know the cached part yet: it reports the whole prompt as
`input_tokens`, and `message_delta` the final split (the SDK takes the later figures).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs

from ...actors.frontend import Frontend
from ...actors.pool import ModelSlot
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
)
from .. import sse
from ..errors import anthropic_error_body


def usage_json(input_tokens: int, output_tokens: int, cached: int = 0) -> dict[str, Any]:
    """`input_tokens`: the whole prompt; `cached`: how much of it the prefix cache served."""
    cached = max(0, min(cached, input_tokens))
    return {
        "input_tokens": input_tokens - cached,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def model_info_json(slot: ModelSlot) -> dict[str, Any]:
    """Anthropic's model object (`GET /v1/models` with an `anthropic-version` header)."""
    fe = slot.frontend
    info: dict[str, Any] = {
        "type": "model",
        "id": slot.name,
        "display_name": slot.name,
        "created_at": datetime.datetime.fromtimestamp(slot.created, datetime.UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "lifecycle": "active",
    }
    if fe is not None:
        info["max_input_tokens"] = fe.context_length
    return info


def model_list_json(slots: Sequence[ModelSlot]) -> dict[str, Any]:
    """Anthropic's page of models: every model on one page."""
    data = [model_info_json(slot) for slot in slots]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def stop_reason(finished: Finished, tool_use: bool = False) -> str:
    if finished.finish_reason == "length":
        return "max_tokens"
    if tool_use and finished.stop_sequence is None:
        return "tool_use"
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def signature(thinking: str) -> str:
    """Thinking blocks carry a signature the SDK passes back; ours is a digest of the text
    (the server does not check it: thinking sent back is only shown to the template)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _event(kind: str, **fields: Any) -> bytes:
    return sse.event(kind, {"type": kind, **fields})


@attrs.define
class MessageRender:
    async def begin(self, model: Frontend, prepared: Prepared) -> None:
        pass

    def prefixes(self) -> list[str]:
        return []

    def message_json(
        self,
        prepared: Prepared,
        content: list[dict[str, Any]],
        output_tokens: int,
        finished: Finished | None,
        cached: int = 0,
    ) -> dict[str, Any]:
        tool_use = any(block.get("type") == "tool_use" for block in content)
        return {
            "id": prepared.request.id,
            "type": "message",
            "role": "assistant",
            "model": prepared.model_name,
            "content": content,
            "stop_reason": stop_reason(finished, tool_use) if finished else None,
            "stop_sequence": finished.stop_sequence if finished else None,
            "usage": usage_json(prepared.prompt_tokens, output_tokens, cached),
        }

    def complete(self, prepared: Prepared, tally: Tally) -> dict[str, Any]:
        choice = tally.choices[0]
        assert choice.finished is not None
        content: list[dict[str, Any]] = []
        if choice.reasoning:
            text = choice.reasoning
            content.append({"type": "thinking", "thinking": text, "signature": signature(text)})
        text = choice.text.strip() if choice.tool_calls else choice.text
        if text or not (choice.tool_calls or choice.reasoning):
            content.append({"type": "text", "text": text})
        for call in choice.tool_calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_{call.id}",
                    "name": call.name,
                    "input": _tool_input(call.arguments),
                }
            )
        usage = choice.finished.usage
        return self.message_json(
            prepared, content, usage.completion_tokens, choice.finished, usage.cached_tokens
        )

    async def stream(
        self,
        prepared: Prepared,
        tally: Tally,
        events: AsyncIterator[tuple[int, StreamEvent]],
    ) -> AsyncIterator[bytes]:
        yield _event("message_start", message=self.message_json(prepared, [], 0, None))
        yield _event("ping")
        blocks = _Blocks()
        async for _, ev in events:
            if isinstance(ev, TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta):
                for chunk in blocks.feed(ev):
                    yield chunk
            elif isinstance(ev, Heartbeat):
                yield _event("ping")
            elif isinstance(ev, Failed):
                error = anthropic_error_body(ev.message, status=ev.status, kind=ev.kind)
                yield sse.event("error", error)
                break
            elif isinstance(ev, Finished):
                for chunk in blocks.finish():
                    yield chunk
                delta = {
                    "stop_reason": stop_reason(ev, blocks.tool_use),
                    "stop_sequence": ev.stop_sequence,
                }
                usage = usage_json(
                    ev.usage.prompt_tokens, ev.usage.completion_tokens, ev.usage.cached_tokens
                )
                yield _event("message_delta", delta=delta, usage=usage)
                yield _event("message_stop")
                break
        else:
            yield sse.event("error", anthropic_error_body(NO_RESULT, status=500))


@attrs.define
class _Blocks:
    """The content blocks of a streamed message: each opened when its first delta comes
    (thinking, text, tool_use), stopped before the next one starts."""

    index: int = -1
    kind: str | None = None
    thinking: list[str] = attrs.field(factory=list)
    tool_use: bool = False

    def open(self, block: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.kind = block["type"]
        return [*out, _event("content_block_start", index=self.index, content_block=block)]

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        out: list[bytes] = []
        if self.kind == "thinking":
            delta = {"type": "signature_delta", "signature": signature("".join(self.thinking))}
            out.append(_event("content_block_delta", index=self.index, delta=delta))
            self.thinking = []
        out.append(_event("content_block_stop", index=self.index))
        self.kind = None
        return out

    def delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", index=self.index, delta=delta)

    def feed(
        self, ev: TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta
    ) -> list[bytes]:
        out: list[bytes] = []
        if isinstance(ev, TextDelta):
            if not ev.text:
                return []
            if self.kind != "text":
                out += self.open({"type": "text", "text": ""})
            out.append(self.delta({"type": "text_delta", "text": ev.text}))
        elif isinstance(ev, ReasoningDelta):
            if self.kind != "thinking":
                out += self.open({"type": "thinking", "thinking": "", "signature": ""})
            self.thinking.append(ev.text)
            out.append(self.delta({"type": "thinking_delta", "thinking": ev.text}))
        elif isinstance(ev, ToolCallStart):
            self.tool_use = True
            block = {"type": "tool_use", "id": f"toolu_{ev.call_id}", "name": ev.name, "input": {}}
            out += self.open(block)
        else:
            out.append(self.delta({"type": "input_json_delta", "partial_json": ev.arguments}))
        return out

    def finish(self) -> list[bytes]:
        if self.index < 0:  # nothing was said: one empty text block
            return [*self.open({"type": "text", "text": ""}), *self.close()]
        return self.close()
