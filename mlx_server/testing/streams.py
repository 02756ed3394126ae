"""Check the order of streamed events, beyond the shape of each one.

A stream can be made only of valid events and still be wrong: a delta before its block
starts, two ``finish_reason``s for one choice, the usage chunk in the middle. These checkers
validate every event (``mlx_server.testing.openapi``) and then the sequence, raising
``StreamOrderError`` (an ``AssertionError``) with the position of the first fault. Each returns
what the stream adds up to, so a test can compare it with the non-streamed answer.

    message = check_anthropic_stream([payload for _, payload in events])
    choices = check_chat_stream(chunks, include_usage=True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from mlx_server.testing import openapi

__all__ = ["ChatChoice", "StreamOrderError", "check_anthropic_stream", "check_chat_stream"]


class StreamOrderError(AssertionError):
    """Events that are each valid arrive in an order the API never produces."""


def _fail(position: int, why: str, event: Any) -> StreamOrderError:
    return StreamOrderError(f"event {position}: {why}\nevent: {event!r:.600}")


# --------------------------------------------------------------------------- Anthropic

# The delta types each kind of content block may receive.
BLOCK_DELTAS = {
    "text": {"text_delta", "citations_delta"},
    "tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
}


def check_anthropic_stream(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Check a Messages stream (the ``data`` objects, in order) and return the message it
    builds: ``message_start``'s message with the blocks filled in and the final ``stop_reason``,
    ``stop_sequence`` and ``usage.output_tokens``.

    The order: ``message_start`` first; then content blocks one at a time, indices 0, 1, 2 ...,
    each ``content_block_start``, deltas of a type that fits the block, ``content_block_stop``;
    then at least one ``message_delta`` (the last one carries the ``stop_reason``); then
    ``message_stop``, last. ``ping`` may come anywhere after ``message_start``. An ``error``
    event may end the stream in place of the rest."""
    if not events:
        raise StreamOrderError("an empty stream")
    for position, event in enumerate(events):
        try:
            openapi.validate("anthropic.MessageStreamEvent", event)
        except AssertionError as exc:
            raise StreamOrderError(f"event {position}: {exc}") from None

    first = events[0]
    if first["type"] != "message_start":
        raise _fail(0, "the stream must open with message_start", first)
    message = json.loads(json.dumps(first["message"]))
    if message["content"] != [] or message["stop_reason"] is not None:
        raise _fail(0, "message_start's message must have no content and no stop_reason", first)

    open_block: int | None = None
    partial_json = ""
    deltas_seen = 0
    stopped = False
    for position, event in enumerate(events[1:], start=1):
        kind = event["type"]
        if stopped:
            raise _fail(position, "nothing may follow message_stop", event)
        if kind == "ping":
            continue
        if kind == "error":
            if position != len(events) - 1:
                raise _fail(position, "an error event ends the stream", event)
            message["error"] = event["error"]
            return message
        if kind == "message_start":
            raise _fail(position, "a second message_start", event)
        if kind == "content_block_start":
            if open_block is not None:
                raise _fail(position, f"block {open_block} is still open", event)
            if deltas_seen:
                raise _fail(position, "a content block after message_delta", event)
            if event["index"] != len(message["content"]):
                raise _fail(position, f"expected block index {len(message['content'])}", event)
            block = json.loads(json.dumps(event["content_block"]))
            if block["type"] == "tool_use":
                if block.get("input") not in ({}, None):
                    raise _fail(position, "a tool_use block starts with empty input", event)
                partial_json = ""
            message["content"].append(block)
            open_block = event["index"]
        elif kind == "content_block_delta":
            if open_block is None or event["index"] != open_block:
                raise _fail(position, f"a delta for block {event['index']}, not open", event)
            block = message["content"][open_block]
            delta = event["delta"]
            allowed = BLOCK_DELTAS.get(block["type"], set())
            if delta["type"] not in allowed:
                raise _fail(position, f"a {delta['type']} for a {block['type']} block", event)
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                partial_json += delta["partial_json"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
        elif kind == "content_block_stop":
            if open_block is None or event["index"] != open_block:
                raise _fail(position, f"stop for block {event['index']}, not open", event)
            block = message["content"][open_block]
            if block["type"] == "tool_use":
                try:
                    block["input"] = json.loads(partial_json) if partial_json else {}
                except json.JSONDecodeError as exc:
                    raise _fail(position, f"the tool input is not JSON: {exc}", event) from None
                if not isinstance(block["input"], dict):
                    raise _fail(position, "the tool input is not an object", event)
            open_block = None
        elif kind == "message_delta":
            if open_block is not None:
                raise _fail(position, f"message_delta while block {open_block} is open", event)
            deltas_seen += 1
            message["stop_reason"] = event["delta"]["stop_reason"]
            message["stop_sequence"] = event["delta"]["stop_sequence"]
            message["usage"]["output_tokens"] = event["usage"]["output_tokens"]
        elif kind == "message_stop":
            if not deltas_seen:
                raise _fail(position, "message_stop without a message_delta before it", event)
            if message["stop_reason"] is None:
                raise _fail(position, "the last message_delta has no stop_reason", event)
            stopped = True
    if not stopped:
        raise StreamOrderError("the stream ended without message_stop")
    return message


# --------------------------------------------------------------------------- OpenAI chat


@attrs.define
class ChatChoice:
    """What a streamed choice adds up to."""

    role: str
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[dict[str, Any]] = attrs.field(factory=list)
    finish_reason: str | None = None


def check_chat_stream(
    chunks: Sequence[Mapping[str, Any]], *, include_usage: bool = False
) -> dict[int, ChatChoice]:
    """Check the JSON chunks of a chat completion stream (without ``[DONE]``) and return each
    choice's text, reasoning, tool calls and finish reason, by choice index.

    The order: one ``id`` (and ``created``, ``model``) for the whole stream; a choice's first
    chunk carries ``role: assistant`` and no later chunk changes it; ``finish_reason`` is set
    exactly once per choice, on its last chunk; a tool call's first fragment names its ``id``,
    ``type`` and function name, later fragments only add arguments. With ``include_usage``,
    the last chunk has no choices and the usage, and every other chunk ``usage: null``; without
    it no chunk carries usage."""
    if not chunks:
        raise StreamOrderError("an empty stream")
    for position, chunk in enumerate(chunks):
        try:
            openapi.validate("openai.ChatCompletionChunk", chunk)
        except AssertionError as exc:
            raise StreamOrderError(f"chunk {position}: {exc}") from None

    head = chunks[0]
    choices: dict[int, ChatChoice] = {}
    for position, chunk in enumerate(chunks):
        for key in ("id", "created", "model"):
            if chunk[key] != head[key]:
                raise _fail(position, f"{key} changed within the stream", chunk)
        last = position == len(chunks) - 1
        usage = chunk.get("usage")
        if include_usage and last:
            if chunk["choices"] != [] or usage is None:
                raise _fail(position, "the last chunk must be the usage chunk", chunk)
            continue
        if usage is not None:
            raise _fail(position, "usage before the end (or without include_usage)", chunk)
        if include_usage and "usage" not in chunk:
            raise _fail(position, "with include_usage every chunk carries usage: null", chunk)
        if not chunk["choices"]:
            raise _fail(position, "a chunk without choices that is not the usage chunk", chunk)
        for choice in chunk["choices"]:
            _chat_choice(position, chunk, choice, choices)
    for index, state in sorted(choices.items()):
        if state.finish_reason is None:
            raise StreamOrderError(f"choice {index} never got a finish_reason")
    if sorted(choices) != list(range(len(choices))):
        raise StreamOrderError(f"choice indices {sorted(choices)} are not 0..n-1")
    return choices


def _chat_choice(
    position: int,
    chunk: Mapping[str, Any],
    choice: Mapping[str, Any],
    choices: dict[int, ChatChoice],
) -> None:
    index = choice["index"]
    delta = choice["delta"]
    state = choices.get(index)
    if state is None:
        if delta.get("role") != "assistant":
            raise _fail(position, f"choice {index} must open with role assistant", chunk)
        state = choices[index] = ChatChoice(role="assistant")
    elif delta.get("role") not in (None, state.role):
        raise _fail(position, f"choice {index} changed role", chunk)
    if state.finish_reason is not None:
        raise _fail(position, f"choice {index} continues after its finish_reason", chunk)
    state.content += delta.get("content") or ""
    state.reasoning_content += delta.get("reasoning_content") or ""
    for call in delta.get("tool_calls") or ():
        slot = call["index"]
        if slot == len(state.tool_calls):
            function = call.get("function") or {}
            if not call.get("id") or call.get("type") != "function" or not function.get("name"):
                raise _fail(position, f"tool call {slot} opens without id/type/name", chunk)
            state.tool_calls.append(
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {
                        "name": function["name"],
                        "arguments": function.get("arguments") or "",
                    },
                }
            )
        elif slot < len(state.tool_calls):
            if call.get("id") or (call.get("function") or {}).get("name"):
                raise _fail(position, f"tool call {slot} renamed mid-stream", chunk)
            arguments = (call.get("function") or {}).get("arguments") or ""
            state.tool_calls[slot]["function"]["arguments"] += arguments
        else:
            raise _fail(position, f"tool call index {slot} skips ahead", chunk)
    state.finish_reason = choice["finish_reason"]
