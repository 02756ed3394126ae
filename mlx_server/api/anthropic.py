"""Anthropic-compatible routes: Messages (streaming and not) and token counting.

Request shape -> chat template:

- `system` (a string or text blocks) becomes a leading system turn.
- Each message's `content` (a string or blocks) is flattened to text: text blocks are joined with
  a blank line; an assistant's `tool_use` blocks become the turn's `tool_calls` (OpenAI's shape,
  arguments as an object, as templates expect) and a user's `tool_result` blocks become `tool`
  turns (with `tool_call_id`; `is_error` results start with "Error: "), rendered by the model's
  own template; `thinking` blocks of earlier turns are dropped, as Anthropic drops them; images
  and documents are refused (text-only model). Consecutive turns of one role are merged, as
  Anthropic does, so templates that insist on alternation still render.
- `tool_choice` and `thinking` are planned by `api.tools` (see there: a forced call prefills the
  start of the family's markup; without `thinking` enabled the reasoning is dropped and the
  template gets `enable_thinking=False`).
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

import base64
import hashlib
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
    OutputSpec,
    PromptSpec,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)
from . import outcome, sse
from .errors import anthropic_error, anthropic_error_body
from .params import Fields, json_body
from .state import models, use_model
from .tools import Plan, ToolRequest, enforce, parse_anthropic_tool_choice, plan

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
    tool_request: ToolRequest | None = None
    thinking: bool = False


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
    turns: list[ChatMessage] = []
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
        parts = _message_turns(role, m["content"], f"{where}.content")
        final_assistant = i == len(raw) - 1 and role == "assistant"
        if not parts and not final_assistant:
            raise InvalidRequest(
                f"'{where}.content' must be non-empty (only a final assistant message may be "
                "empty)",
                param=f"{where}.content",
            )
        if not parts:
            parts = [ChatMessage(role=role, content="")]
        for part in parts:
            _append_turn(turns, part)
    prefill: str | None = None
    if turns[-1].role == "assistant" and not turns[-1].extra:
        prefill = turns.pop().content or None
    chat: list[ChatMessage] = []
    system = _system_text(body.get("system"))
    if system is not None:
        chat.append(ChatMessage(role="system", content=system))
    chat.extend(turns)
    tools_json = _tools_json(body.get("tools"))
    return Prompt(
        chat=tuple(chat),
        prefill=prefill,
        tools_json=tools_json,
        tool_request=parse_anthropic_tool_choice(body.get("tool_choice"), tools_json),
        thinking=_thinking(body.get("thinking")),
    )


def _thinking(raw: Any) -> bool:
    """Whether the request enables extended thinking (`budget_tokens` is accepted, not
    enforced: the model stops thinking on its own)."""
    if raw is None:
        return False
    if not isinstance(raw, dict) or raw.get("type") not in ("enabled", "disabled"):
        raise InvalidRequest(
            '\'thinking\' must be {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}',
            param="thinking",
        )
    if raw["type"] == "disabled":
        return False
    budget = raw.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidRequest(
            "'thinking.budget_tokens' must be a positive integer", param="thinking.budget_tokens"
        )
    return True


def _message_turns(role: str, content: Any, where: str) -> list[ChatMessage]:
    """One Anthropic message as template turns: a user's `tool_result` blocks become `tool`
    turns (first, as Anthropic puts them), an assistant's `tool_use` blocks its `tool_calls`."""
    if isinstance(content, str):
        return [ChatMessage(role=role, content=content)] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}' must be a string or a list of content blocks", param=where)
    results: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result" and role == "user":
            assert isinstance(block, dict)
            text = _tool_result_text(block.get("content"), f"{at}.content")
            if block.get("is_error") is True:
                text = f"Error: {text}"
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise InvalidRequest(
                    f"'{at}.tool_use_id' must be a string", param=f"{at}.tool_use_id"
                )
            extra = (("tool_call_id", json.dumps(call_id)),)
            results.append(ChatMessage(role="tool", content=text, extra=extra))
        elif kind == "tool_use" and role == "assistant":
            assert isinstance(block, dict)
            name = block.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"'{at}.name' must be a string", param=f"{at}.name")
            args = block.get("input", {})
            if not isinstance(args, dict):
                raise InvalidRequest(f"'{at}.input' must be an object", param=f"{at}.input")
            call: dict[str, Any] = {
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            if isinstance(block.get("id"), str):
                call["id"] = block["id"]
            calls.append(call)
        else:
            text = _block_text(block, at)
            if text is not None:
                texts.append(text)
    out = list(results)
    text = _BLOCK_SEPARATOR.join(t for t in texts if t)
    if calls:
        extra = (("tool_calls", json.dumps(calls, ensure_ascii=False)),)
        out.append(ChatMessage(role=role, content=text or None, extra=extra))
    elif text:
        out.append(ChatMessage(role=role, content=text))
    return out


def _append_turn(turns: list[ChatMessage], turn: ChatMessage) -> None:
    """Merge a turn into the previous one of the same role (not tool turns)."""
    last = turns[-1] if turns else None
    if last is None or last.role != turn.role or turn.role == "tool":
        turns.append(turn)
        return
    content = _BLOCK_SEPARATOR.join(c for c in (last.content, turn.content) if c) or None
    calls: list[Any] = []
    for m in (last, turn):
        for key, value in m.extra:
            if key == "tool_calls":
                calls.extend(json.loads(value))
    extra = (("tool_calls", json.dumps(calls, ensure_ascii=False)),) if calls else ()
    turns[-1] = ChatMessage(role=turn.role, content=content, extra=extra)


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
    p = prompt_plan(fe, prompt)
    kwargs = p.template_kwargs_json
    if prompt.prefill is None:
        return await fe.prompt_ids(
            PromptSpec(
                chat=prompt.chat,
                tools_json=p.tools_json,
                template_kwargs_json=kwargs,
                prefill=p.prefill,
            )
        )

    def closed_turn(content: str) -> PromptSpec:
        turn = ChatMessage(role="assistant", content=content)
        return PromptSpec(
            chat=(*prompt.chat, turn),
            add_generation_prompt=False,
            tools_json=p.tools_json,
            template_kwargs_json=kwargs,
        )

    full = await fe.prompt_ids(closed_turn(prompt.prefill + p.prefill))
    empty = await fe.prompt_ids(closed_turn(""))
    return full[: len(full) - _closing_length(full, empty)]


def prompt_plan(fe: Frontend, prompt: Prompt) -> Plan:
    """Tools for the template, the stream's parsing, a forced call's prefill, template kwargs:
    reasoning is kept (as thinking blocks) only when the request enables thinking."""
    return plan(
        fe,
        prompt.tool_request,
        reasoning="split" if prompt.thinking else "drop",
        enable_thinking=prompt.thinking,
    )


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


def stop_reason(finished: Finished, tool_use: bool = False) -> str:
    if finished.finish_reason == "length":
        return "max_tokens"
    if tool_use and finished.stop_sequence is None:
        return "tool_use"
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
    tool_use = any(block.get("type") == "tool_use" for block in content)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finished, tool_use) if finished else None,
        "stop_sequence": finished.stop_sequence if finished else None,
        "usage": usage_json(usage.prompt_tokens, usage.completion_tokens),
    }


# -- routes ------------------------------------------------------------------------------------


@bp.post("/v1/messages/count_tokens")
async def count_tokens() -> Response | dict[str, Any]:
    models()  # 503 until the server is ready
    body = await json_body()
    model = _model(body)
    prompt = parse_prompt(body)
    fe = await use_model(model)
    return {"input_tokens": len(await prompt_ids(fe, prompt))}


@bp.post("/v1/messages")
async def create_message() -> Response | dict[str, Any]:
    models()  # 503 until the server is ready
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
    fe = await use_model(model)

    ids = await prompt_ids(fe, prompt)
    tool_plan = prompt_plan(fe, prompt)
    request = GenerationRequest(
        request_id=f"msg_{uuid.uuid4().hex}",
        prompt_ids=ids,
        sampling=sampling,
        max_tokens=fe.check_length(ids, max_tokens),
        stop=stop,
        constraint=await enforce(fe, tool_plan),
    )
    output = tool_plan.output
    if stream:
        return await _stream_message(fe, request, output)
    return await _complete_message(fe, request, output)


def _signature(thinking: str) -> str:
    """Thinking blocks carry a signature the SDK passes back; ours is a digest of the text
    (the server does not check it: earlier thinking is dropped from prompts anyway)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _complete_message(
    fe: Frontend, request: GenerationRequest, output: OutputSpec
) -> Response | dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    args: list[list[str]] = []
    watch = outcome.current()
    with fe.start_stream(request, output) as events:
        async for ev in watch.observe(events, prompt_tokens=len(request.prompt_ids)):
            if isinstance(ev, TextDelta):
                texts.append(ev.text)
            elif isinstance(ev, ReasoningDelta):
                thinking.append(ev.text)
            elif isinstance(ev, ToolCallStart):
                calls.append({"type": "tool_use", "id": f"toolu_{ev.call_id}", "name": ev.name})
                args.append([])
            elif isinstance(ev, ToolCallArgsDelta):
                args[ev.index].append(ev.arguments)
            elif isinstance(ev, Failed):
                return anthropic_error(ev.message, status=ev.status, kind=ev.kind)
            elif isinstance(ev, Finished):
                content: list[dict[str, Any]] = []
                if thinking:
                    text = "".join(thinking)
                    content.append(
                        {"type": "thinking", "thinking": text, "signature": _signature(text)}
                    )
                text = "".join(texts)
                if calls:
                    text = text.strip()
                if text or not (calls or thinking):
                    content.append({"type": "text", "text": text})
                for call, parts in zip(calls, args, strict=True):
                    content.append({**call, "input": _tool_input("".join(parts))})
                return message_json(request.request_id, fe.model_name, content, ev.usage, ev)
    return anthropic_error("the generation ended without a result", status=500)


@attrs.define
class _Blocks:
    """The content blocks of a streamed message: each opened when its first delta comes
    (thinking, text, tool_use), stopped before the next one starts."""

    index: int = -1
    kind: str | None = None
    thinking: list[str] = attrs.field(factory=list)
    tool_use: bool = False

    def _event(self, kind: str, **fields: Any) -> bytes:
        return sse.event(kind, {"type": kind, **fields})

    def open(self, block: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.index += 1
        self.kind = block["type"]
        return [*out, self._event("content_block_start", index=self.index, content_block=block)]

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        out: list[bytes] = []
        if self.kind == "thinking":
            delta = {"type": "signature_delta", "signature": _signature("".join(self.thinking))}
            out.append(self._event("content_block_delta", index=self.index, delta=delta))
            self.thinking = []
        out.append(self._event("content_block_stop", index=self.index))
        self.kind = None
        return out

    def delta(self, delta: dict[str, Any]) -> bytes:
        return self._event("content_block_delta", index=self.index, delta=delta)

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
        if self.index < 0:  # nothing was said: one empty text block, as before
            return [*self.open({"type": "text", "text": ""}), *self.close()]
        return self.close()


async def _stream_message(fe: Frontend, request: GenerationRequest, output: OutputSpec) -> Response:
    # Submit now so that a full queue is an HTTP error before any byte is sent.
    handle = fe.start_stream(request, output)
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
            blocks = _Blocks()
            async for ev in events:
                if isinstance(ev, TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta):
                    for chunk in blocks.feed(ev):
                        yield chunk
                elif isinstance(ev, Heartbeat):
                    yield event("ping")
                elif isinstance(ev, Failed):
                    error = anthropic_error_body(ev.message, status=ev.status, kind=ev.kind)
                    yield sse.event("error", error)
                    break
                elif isinstance(ev, Finished):
                    for chunk in blocks.finish():
                        yield chunk
                    reason = stop_reason(ev, blocks.tool_use)
                    delta = {"stop_reason": reason, "stop_sequence": ev.stop_sequence}
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
