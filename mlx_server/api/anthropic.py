"""Anthropic-compatible routes: Messages (streaming and not) and token counting.

Request shape -> chat template:

- `system` (a string or text blocks) becomes a leading system turn.
- Each message's `content` (a string or blocks) is flattened to text: text blocks are joined with
  a blank line; `tool_use` and `tool_result` blocks become `<tool_use ...>` / `<tool_result ...>`
  text (real tool calling comes later); `thinking` blocks of earlier turns are dropped, as
  Anthropic drops them; images and documents are refused (text-only model). Consecutive turns of
  one role are merged, as Anthropic does, so templates that insist on alternation still render.
- A trailing assistant message is a prefill: the generation continues it and the response holds
  only the continuation. The template renders the whole chat without a generation prompt, and
  whatever the template wrote after the prefill (ChatML: `<|im_end|>\\n`) is cut off, token by
  token. That tail is found by also rendering the chat with an empty final turn: the two token
  sequences share it as a common suffix. This works with ChatML, Llama 3 and templates that skip
  empty turns, and needs no string surgery on the rendered prompt.
- `tools` go to the template (as OpenAI-style function definitions, which Hugging Face templates
  expect), so they are counted the same way by `/v1/messages` and `/v1/messages/count_tokens`.

Usage: `input_tokens` is the whole prompt, the same number `count_tokens` returns. The server's
prompt cache is automatic, not something the request asked for with `cache_control`, and
Anthropic's cache fields add to `input_tokens`; so they are reported as 0 rather than double
counting the prompt or breaking the `count_tokens` equality.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs
from quart import Blueprint, Response

from ..errors import InvalidRequest
from ..messages import (
    ChatMessage,
    Failed,
    Finished,
    GenerationRequest,
    Heartbeat,
    PromptSpec,
    SamplingParams,
    TextDelta,
    Usage,
)
from . import outcome, sse
from .errors import anthropic_error, anthropic_error_body
from .params import Fields, json_body
from .state import frontend

if TYPE_CHECKING:
    from ..actors.frontend import Frontend

bp = Blueprint("anthropic", __name__)

_ROLES = ("user", "assistant")
_BLOCK_SEPARATOR = "\n\n"
_UNSUPPORTED_BLOCKS = ("image", "document", "container_upload")
_DROPPED_BLOCKS = ("thinking", "redacted_thinking")


@bp.after_request
async def _request_id(response: Response) -> Response:
    """Anthropic answers every request with a `request-id` header; the SDK exposes it. It is
    the same id as `x-request-id` and the access log's."""
    if "request-id" not in response.headers:
        response.headers["request-id"] = outcome.current().request_id
    return response


# -- request parsing ---------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Prompt:
    """The prompt part of a Messages request: the chat up to the turn to generate, an optional
    prefill that the generation continues, and the tools for the template."""

    chat: tuple[ChatMessage, ...]
    prefill: str | None = None
    tools_json: str | None = None


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of blocks", param=where)
    parts: list[str] = []
    for j, block in enumerate(content):
        text = _block_text(block, f"{where}[{j}]")
        if text is not None:
            parts.append(text)
    return _BLOCK_SEPARATOR.join(parts)


def _block_text(block: Any, where: str) -> str | None:
    """One content block as text for the template; None for blocks that are dropped."""
    if not isinstance(block, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=where)
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"'{where}.text' must be a string", param=f"{where}.text")
        return text
    if kind in _UNSUPPORTED_BLOCKS:
        raise InvalidRequest(
            f"'{where}': content block type {kind!r} is not supported (text-only model)",
            param=where,
        )
    if kind in _DROPPED_BLOCKS:
        return None
    if kind in ("tool_use", "server_tool_use"):
        name = block.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(f"'{where}.name' must be a string", param=f"{where}.name")
        args = json.dumps(block.get("input", {}), ensure_ascii=False)
        return f'<tool_use id="{block.get("id", "")}" name="{name}">{args}</tool_use>'
    if kind == "tool_result":
        attributes = f'tool_use_id="{block.get("tool_use_id", "")}"'
        if block.get("is_error") is True:
            attributes += ' is_error="true"'
        text = _tool_result_text(block.get("content"), f"{where}.content")
        return f"<tool_result {attributes}>{text}</tool_result>"
    raise InvalidRequest(f"'{where}': unknown content block type {kind!r}", param=where)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content blocks", param=where)
    parts: list[str] = []
    for j, block in enumerate(content):
        text = _block_text(block, f"{where}[{j}]")
        if text is not None:
            parts.append(text)
    return _BLOCK_SEPARATOR.join(parts)


def _system_text(system: Any) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    if not isinstance(system, list):
        raise InvalidRequest("'system' must be a string or a list of text blocks", param="system")
    parts: list[str] = []
    for j, block in enumerate(system):
        where = f"system[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"'{where}' must be a text block", param=where)
        text = block.get("text")
        if not isinstance(text, str):
            raise InvalidRequest(f"'{where}.text' must be a string", param=f"{where}.text")
        parts.append(text)
    return _BLOCK_SEPARATOR.join(parts) or None


def _tools_json(tools: Any) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array", param="tools")
    out: list[dict[str, Any]] = []
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"'{where}' must be an object with a string 'name'", param=where)
        if tool.get("type") in (None, "custom"):
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    f"'{where}.input_schema' must be an object", param=f"{where}.input_schema"
                )
            function: dict[str, Any] = {"name": tool["name"]}
            if isinstance(tool.get("description"), str):
                function["description"] = tool["description"]
            function["parameters"] = schema
            out.append({"type": "function", "function": function})
        else:  # a server tool (web search, bash, ...): the template sees it as given
            out.append(tool)
    return json.dumps(out, ensure_ascii=False) if out else None


def parse_prompt(body: dict[str, Any]) -> Prompt:
    """`system`, `messages` and `tools` of a Messages or count_tokens request."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"'{where}.role' must be 'user' or 'assistant', got {role!r}"
                + (" (use the top-level 'system' parameter)" if role == "system" else ""),
                param=f"{where}.role",
            )
        if "content" not in m:
            raise InvalidRequest(f"'{where}.content' is required", param=f"{where}.content")
        text = _content_text(m["content"], f"{where}.content")
        final_assistant = i == len(raw) - 1 and role == "assistant"
        if not text and not final_assistant:
            raise InvalidRequest(
                f"'{where}.content' must be non-empty (only a final assistant message may be "
                "empty)",
                param=f"{where}.content",
            )
        if turns and turns[-1][0] == role:
            if text:
                turns[-1] = (role, turns[-1][1] + _BLOCK_SEPARATOR + text)
        else:
            turns.append((role, text))
    prefill: str | None = None
    if turns[-1][0] == "assistant":
        prefill = turns.pop()[1] or None
    chat: list[ChatMessage] = []
    system = _system_text(body.get("system"))
    if system is not None:
        chat.append(ChatMessage(role="system", content=system))
    chat.extend(ChatMessage(role=role, content=text) for role, text in turns)
    return Prompt(chat=tuple(chat), prefill=prefill, tools_json=_tools_json(body.get("tools")))


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", param="model")
    return model


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("'stop_sequences' must be an array of strings", param="stop_sequences")
    return tuple(s for s in value if s)


def parse_sampling(f: Fields) -> SamplingParams:
    """Anthropic's sampling fields; its temperature range is 0..1."""
    temperature = f.number("temperature", 1.0, lo=0.0, hi=1.0)
    top_p = f.number("top_p", 1.0, lo=0.0, hi=1.0)
    top_k = f.integer("top_k", 0, lo=0)
    assert temperature is not None and top_p is not None and top_k is not None
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)


# -- prompt tokens -----------------------------------------------------------------------------


async def prompt_ids(fe: Frontend, prompt: Prompt) -> tuple[int, ...]:
    """The prompt's token ids: the one function behind both routes, so `count_tokens` always
    equals the `input_tokens` of the same request."""
    if prompt.prefill is None:
        return await fe.prompt_ids(PromptSpec(chat=prompt.chat, tools_json=prompt.tools_json))

    def closed_turn(content: str) -> PromptSpec:
        turn = ChatMessage(role="assistant", content=content)
        return PromptSpec(
            chat=(*prompt.chat, turn), add_generation_prompt=False, tools_json=prompt.tools_json
        )

    full = await fe.prompt_ids(closed_turn(prompt.prefill))
    empty = await fe.prompt_ids(closed_turn(""))
    return full[: len(full) - _closing_length(full, empty)]


def _closing_length(full: tuple[int, ...], empty: tuple[int, ...]) -> int:
    """How many tokens at the end of `full` the template wrote after the final turn's content:
    the common suffix of `full` and `empty`, never reaching into their common prefix."""
    prefix = 0
    for a, b in zip(full, empty, strict=False):
        if a != b:
            break
        prefix += 1
    room = min(len(full), len(empty)) - prefix
    suffix = 0
    while suffix < room and full[-1 - suffix] == empty[-1 - suffix]:
        suffix += 1
    return suffix


# -- response shapes ---------------------------------------------------------------------------


def usage_json(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def stop_reason(finished: Finished) -> str:
    if finished.finish_reason == "length":
        return "max_tokens"
    if finished.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def message_json(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    usage: Usage,
    finished: Finished | None,
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finished) if finished else None,
        "stop_sequence": finished.stop_sequence if finished else None,
        "usage": usage_json(usage.prompt_tokens, usage.completion_tokens),
    }


# -- routes ------------------------------------------------------------------------------------


@bp.post("/v1/messages/count_tokens")
async def count_tokens() -> Response | dict[str, Any]:
    fe = frontend()
    body = await json_body()
    model = _model(body)
    prompt = parse_prompt(body)
    fe.check_model(model)
    return {"input_tokens": len(await prompt_ids(fe, prompt))}


@bp.post("/v1/messages")
async def create_message() -> Response | dict[str, Any]:
    fe = frontend()
    body = await json_body()
    f = Fields(body)
    model = _model(body)
    prompt = parse_prompt(body)
    max_tokens = f.integer("max_tokens", None, lo=1)
    if max_tokens is None:
        raise InvalidRequest("'max_tokens' is required", param="max_tokens")
    sampling = parse_sampling(f)
    stop = _stop_sequences(body.get("stop_sequences"))
    stream = f.boolean("stream", False)
    metadata = f.obj("metadata") or {}  # accepted; user_id is not used
    if metadata.get("user_id") is not None and not isinstance(metadata["user_id"], str):
        raise InvalidRequest("'metadata.user_id' must be a string", param="metadata.user_id")
    fe.check_model(model)

    ids = await prompt_ids(fe, prompt)
    request = GenerationRequest(
        request_id=f"msg_{uuid.uuid4().hex}",
        prompt_ids=ids,
        sampling=sampling,
        max_tokens=fe.check_length(ids, max_tokens),
        stop=stop,
    )
    if stream:
        return await _stream_message(fe, request)
    return await _complete_message(fe, request)


async def _complete_message(fe: Frontend, request: GenerationRequest) -> Response | dict[str, Any]:
    texts: list[str] = []
    watch = outcome.current()
    with fe.start_stream(request) as events:
        async for ev in watch.observe(events, prompt_tokens=len(request.prompt_ids)):
            if isinstance(ev, TextDelta):
                texts.append(ev.text)
            elif isinstance(ev, Failed):
                return anthropic_error(ev.message, status=ev.status, kind=ev.kind)
            elif isinstance(ev, Finished):
                content = [{"type": "text", "text": "".join(texts)}]
                return message_json(request.request_id, fe.model_name, content, ev.usage, ev)
    return anthropic_error("the generation ended without a result", status=500)


async def _stream_message(fe: Frontend, request: GenerationRequest) -> Response:
    # Submit now so that a full queue is an HTTP error before any byte is sent.
    handle = fe.start_stream(request)
    input_tokens = len(request.prompt_ids)
    events = outcome.current().observe(handle.events, prompt_tokens=input_tokens)

    def event(kind: str, **fields: Any) -> bytes:
        return sse.event(kind, {"type": kind, **fields})

    async def body() -> AsyncIterator[bytes]:
        try:
            start = Usage(prompt_tokens=input_tokens, completion_tokens=0)
            message = message_json(request.request_id, fe.model_name, [], start, None)
            yield event("message_start", message=message)
            yield event("ping")
            yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            async for ev in events:
                if isinstance(ev, TextDelta):
                    if ev.text:
                        delta = {"type": "text_delta", "text": ev.text}
                        yield event("content_block_delta", index=0, delta=delta)
                elif isinstance(ev, Heartbeat):
                    yield event("ping")
                elif isinstance(ev, Failed):
                    error = anthropic_error_body(ev.message, status=ev.status, kind=ev.kind)
                    yield sse.event("error", error)
                    break
                elif isinstance(ev, Finished):
                    yield event("content_block_stop", index=0)
                    delta = {"stop_reason": stop_reason(ev), "stop_sequence": ev.stop_sequence}
                    usage = usage_json(ev.usage.prompt_tokens, ev.usage.completion_tokens)
                    yield event("message_delta", delta=delta, usage=usage)
                    yield event("message_stop")
                    break
            else:
                message = "the generation ended without a result"
                yield sse.event("error", anthropic_error_body(message, status=500))
        finally:
            handle.close()

    return Response(sse.ClosingBody(body(), handle.close), status=200, headers=sse.SSE_HEADERS)
