"""A Messages request -> the internal `generation.Request`.

- `system` (a string or text blocks) becomes a leading system turn; text blocks that are
  billing headers (`x-anthropic-billing-header: ...`, Claude Code's first block, which changes
  every request) are left out, so the prompt's first bytes stay the same and the prefix cache
  reaches past them.
- `system` / `developer` entries inside `messages` (Claude Code's mid-conversation system
  text) stay system turns where they stand (`generation.system_turns` folds them into the next
  user turn for templates that refuse them): never hoisted, so the prompt before them is the
  same from one turn to the next.
- Each message's content is flattened to text: text blocks joined with a blank line; an
  assistant's `tool_use` blocks become the turn's tool calls and a user's `tool_result` blocks
  become `tool` turns (first, as Anthropic puts them; `is_error` results start with "Error: "),
  rendered by the model's own template; an assistant's `thinking` blocks become the turn's
  reasoning, which the template shows or drops (as the OpenAI route's `reasoning_content`);
  images and documents are refused (text-only model). Consecutive turns of one role are
  merged, as Anthropic does, so templates that insist on alternation still render.
- A trailing assistant message is a prefill: the generation continues it and the response holds
  only the continuation (`generation.prepare` cuts what the template writes after it).
- `tools` go to the template as OpenAI-style functions (server tools as given), so
  `/v1/messages` and `count_tokens` count them the same way; `tool_choice` "any" / "tool" force a
  call; reasoning is kept (as thinking blocks) only when `thinking` is enabled or adaptive
  (and not `display: "omitted"`).
- `thinking` maps onto the template's `enable_thinking`; `output_config.effort` onto its
  `reasoning_effort` (low / medium / high; xhigh and max as high).
- `output_config.format` (or the older `output_format`), a JSON schema, is enforced by
  constrained decoding.
"""

from __future__ import annotations

import json
import uuid

import attrs

from ...errors import InvalidRequest
from ...generation import Request, Sampling, ToolChoice
from ...messages import ChatMessage, ConstraintSpec, ImageRef, ToolCall, ToolSpec
from . import protocol as p

SEPARATOR = "\n\n"


def messages_request(body: p.CountTokensRequest) -> Request:
    chat, prefill = _chat(body)
    thinking = _thinking(body.thinking)
    tools = _tools(body.tools)
    output_format, where = _output_format(body)
    request = Request(
        id=f"msg_{uuid.uuid4().hex}",
        model=body.model,
        chat=chat,
        prefill=prefill,
        tools=tools,
        tool_choice=_tool_choice(body.tool_choice, tools),
        reasoning="split" if _shows_thinking(body.thinking) else "drop",
        enable_thinking=thinking,
        template_kwargs=_effort(body.output_config),
        constraint=output_format,
        constraint_param=where,
    )
    if not isinstance(body, p.MessagesRequest):
        return request
    return attrs.evolve(
        request,
        sampling=Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k),
        max_tokens=body.max_tokens,
        stop=tuple(s for s in body.stop_sequences or () if s),
        stream=bool(body.stream),
    )


def _thinking(raw: p.Thinking | None) -> bool:
    """Whether the template should let the model think (`enable_thinking`)."""
    if raw is None or raw.type in ("disabled", "between_tools"):
        return False
    if raw.type == "enabled" and raw.budget_tokens is None:
        raise InvalidRequest(
            "'thinking.budget_tokens' must be a positive integer", param="thinking.budget_tokens"
        )
    return True


def _shows_thinking(raw: p.Thinking | None) -> bool:
    """Whether reasoning comes back as thinking blocks."""
    if raw is None or raw.type == "disabled" or raw.display == "omitted":
        return False
    return True


EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _effort(config: p.OutputConfig | None) -> dict[str, str]:
    """`output_config.effort` as the template's `reasoning_effort` (gpt-oss's control; templates
    without one ignore it)."""
    if config is None or config.effort is None:
        return {}
    return {"reasoning_effort": EFFORT[config.effort]}


def _output_format(body: p.CountTokensRequest) -> tuple[ConstraintSpec | None, str]:
    if body.output_config is not None and body.output_config.format is not None:
        schema = body.output_config.format.json_schema
        return ConstraintSpec.json_schema(schema), "output_config.format.schema"
    if body.output_format is not None:
        return ConstraintSpec.json_schema(body.output_format.json_schema), "output_format.schema"
    return None, "output_config.format"


def _tools(tools: list[p.ToolIn] | None) -> tuple[ToolSpec, ...]:
    out: list[ToolSpec] = []
    for j, tool in enumerate(tools or ()):
        if tool.type in (None, "custom"):
            if tool.input_schema is None:
                where = f"tools[{j}].input_schema"
                raise InvalidRequest(f"'{where}' must be an object", param=where)
            out.append(
                ToolSpec(name=tool.name, description=tool.description, parameters=tool.input_schema)
            )
        else:  # a server tool (web search, bash, ...): the template sees it as given
            raw = tool.model_dump(exclude_none=True)
            out.append(ToolSpec(name=tool.name, raw=raw))
    return tuple(out)


def _tool_choice(raw: p.ToolChoiceIn | None, tools: tuple[ToolSpec, ...]) -> ToolChoice:
    kind = raw.type if raw is not None else "auto"
    parallel = raw is None or raw.disable_parallel_tool_use is not True
    if not tools:
        if kind in ("any", "tool"):
            raise InvalidRequest(
                "'tool_choice' requires 'tools' (no tools were given)", param="tool_choice"
            )
        return ToolChoice()
    name: str | None = None
    if kind == "tool":
        assert raw is not None
        name = raw.name
        if not name:
            raise InvalidRequest(
                "'tool_choice.name' is required for type 'tool'", param="tool_choice.name"
            )
        if name not in [t.name for t in tools if t.raw is None]:
            raise InvalidRequest(
                f"'tool_choice.name' is {name!r}, which is not in 'tools'",
                param="tool_choice.name",
            )
    mode = {"auto": "auto", "none": "none"}.get(kind, "required")
    return ToolChoice(mode=mode, name=name, parallel=parallel)  # type: ignore[arg-type]


def _chat(body: p.CountTokensRequest) -> tuple[tuple[ChatMessage, ...], str | None]:
    if all(m.role in ("system", "developer") for m in body.messages):
        raise InvalidRequest(
            "'messages' must hold a user or assistant message, not only system entries",
            param="messages",
        )
    turns: list[ChatMessage] = []
    last = len(body.messages) - 1
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        parts = _message_turns(m, where)
        final_assistant = i == last and m.role == "assistant"
        if not parts and not final_assistant:
            raise InvalidRequest(
                f"'{where}' must be non-empty (only a final assistant message may be empty)",
                param=where,
            )
        for part in parts or [ChatMessage(role=m.role, content="")]:
            _append_turn(turns, part)
    prefill: str | None = None
    if turns[-1].role == "assistant" and not turns[-1].tool_calls:
        prefill = turns.pop().content or None
    system = _system_text(body.system)
    chat = ([ChatMessage(role="system", content=system)] if system is not None else []) + turns
    return tuple(chat), prefill


BILLING_HEADER = "x-anthropic-billing-header:"


def _system_text(system: str | list[p.SystemText] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    texts = [b.text for b in system if not b.text.lstrip().startswith(BILLING_HEADER)]
    return SEPARATOR.join(texts) or None


def _message_turns(m: p.MessageIn, where: str) -> list[ChatMessage]:
    """One message as template turns: a user's tool results become `tool` turns, an
    assistant's tool uses its tool calls and its thinking its reasoning."""
    role = "system" if m.role == "developer" else m.role
    if isinstance(m.content, str):
        return [ChatMessage(role=role, content=m.content)] if m.content else []
    results: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[ToolCall] = []
    thoughts: list[str] = []
    images: list[ImageRef] = []
    for j, block in enumerate(m.content):
        at = f"{where}[{j}]"
        if isinstance(block, p.MediaBlock) and block.type == "image" and role == "user":
            offset = len(SEPARATOR.join(t for t in texts if t))
            images.append(ImageRef(source=_image_source(block, at), offset=offset, param=at))
        elif isinstance(block, p.ThinkingBlock) and role == "assistant":
            if block.type == "thinking" and block.thinking:
                thoughts.append(block.thinking)
        elif role == "system" and not isinstance(block, p.TextBlock):
            raise InvalidRequest(
                f"'{at}': a system message takes text blocks only, got {block.type!r}",
                param=at,
            )
        elif isinstance(block, p.ToolResultBlock) and m.role == "user":
            text, shown = _result_parts(block.content, f"{at}.content")
            if block.is_error is True:
                text = f"Error: {text}"
                shown = tuple(attrs.evolve(r, offset=r.offset + 7) for r in shown)
            results.append(
                ChatMessage(role="tool", content=text, tool_call_id=block.tool_use_id, images=shown)
            )
        elif isinstance(block, p.ToolUseBlock) and m.role == "assistant":
            calls.append(ToolCall(name=block.name, arguments=block.input, id=block.id))
        else:
            text = _block_text(block, at)
            if text is not None:
                texts.append(text)
    out = list(results)
    text = SEPARATOR.join(t for t in texts if t)
    reasoning = "\n".join(thoughts) or None
    if calls or (reasoning and text):
        out.append(
            ChatMessage(
                role=role, content=text or None, tool_calls=tuple(calls), reasoning=reasoning
            )
        )
    elif text or images:
        out.append(ChatMessage(role=role, content=text, images=tuple(images)))
    elif reasoning:  # thinking only: a prefill that continues after the thinking
        out.append(ChatMessage(role=role, content="", reasoning=reasoning))
    return out


def _image_source(block: p.MediaBlock, where: str) -> str:
    """An image block's source as the frontend decodes it: a data URL for base64 data, the
    URL itself for a url source (fetched only when the server allows it)."""
    source = block.source or {}
    kind = source.get("type")
    if kind == "base64":
        data, media = source.get("data"), source.get("media_type")
        if not isinstance(data, str) or not data:
            raise InvalidRequest(f"'{where}.source.data' is required", param=f"{where}.source.data")
        if not isinstance(media, str):
            raise InvalidRequest(
                f"'{where}.source.media_type' is required", param=f"{where}.source.media_type"
            )
        return f"data:{media};base64,{data}"  # the decoder checks the type and the bytes
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"'{where}.source.url' is required", param=f"{where}.source.url")
        return url
    raise InvalidRequest(
        f"'{where}.source.type' must be 'base64' or 'url', got {kind!r}",
        param=f"{where}.source.type",
    )


def _block_text(block: p.Block, where: str) -> str | None:
    """A block as text for the template; None for blocks that are dropped."""
    if isinstance(block, p.TextBlock):
        return block.text
    if isinstance(block, p.MediaBlock):
        raise InvalidRequest(
            f"'{where}': content block type {block.type!r} is not supported here "
            "(images go in user messages)",
            param=where,
        )
    if isinstance(block, p.ThinkingBlock):
        return None
    if isinstance(block, p.ToolUseBlock):
        args = json.dumps(block.input, ensure_ascii=False)
        return f'<tool_use id="{block.id or ""}" name="{block.name}">{args}</tool_use>'
    attributes = f'tool_use_id="{block.tool_use_id}"'
    if block.is_error is True:
        attributes += ' is_error="true"'
    text = _result_text(block.content, f"{where}.content")
    return f"<tool_result {attributes}>{text}</tool_result>"


def _result_text(content: str | list[p.Block] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [_block_text(block, f"{where}[{j}]") for j, block in enumerate(content)]
    return SEPARATOR.join(t for t in parts if t is not None)


def _result_parts(
    content: str | list[p.Block] | None, where: str
) -> tuple[str, tuple[ImageRef, ...]]:
    """A tool result's text and its images (a screenshot a tool returned), each image at its
    place in the text."""
    if content is None or isinstance(content, str):
        return content or "", ()
    texts: list[str] = []
    images: list[ImageRef] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(block, p.MediaBlock) and block.type == "image":
            offset = len(SEPARATOR.join(texts))
            images.append(ImageRef(source=_image_source(block, at), offset=offset, param=at))
            continue
        text = _block_text(block, at)
        if text is not None:
            texts.append(text)
    return SEPARATOR.join(texts), tuple(images)


def _append_turn(turns: list[ChatMessage], turn: ChatMessage) -> None:
    """Merge a turn into the previous one of the same role (not tool turns)."""
    last = turns[-1] if turns else None
    if last is None or last.role != turn.role or turn.role == "tool":
        turns.append(turn)
        return
    content = SEPARATOR.join(c for c in (last.content, turn.content) if c) or None
    reasoning = "\n".join(r for r in (last.reasoning, turn.reasoning) if r) or None
    shift = len(content or "") - len(turn.content or "")  # where the later turn's text starts
    images = last.images + tuple(
        attrs.evolve(ref, offset=ref.offset + shift) for ref in turn.images
    )
    turns[-1] = ChatMessage(
        role=turn.role,
        content=content,
        tool_calls=last.tool_calls + turn.tool_calls,
        reasoning=reasoning,
        images=images,
    )
