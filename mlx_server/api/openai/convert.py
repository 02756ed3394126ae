"""OpenAI request models -> the internal `generation.Request` (the rules between fields live
here; each field's own rules are `protocol.py`'s)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from ...errors import InvalidRequest
from ...generation import Request, Sampling, ToolChoice
from ...messages import ChatMessage, ConstraintSpec, ImageRef, PromptSpec, ToolCall, ToolSpec
from . import protocol as p

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def sampling(body: p.Sampling, *, logprobs: bool = False, top_logprobs: int = 0) -> Sampling:
    bias: list[tuple[int, float]] = []
    for key, value in (body.logit_bias or {}).items():
        try:
            bias.append((int(key), value))
        except ValueError:
            raise InvalidRequest(
                f"'logit_bias' key {key!r} is not a token id", param="logit_bias"
            ) from None
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        logit_bias=tuple(bias),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def response_format(value: p.ResponseFormat | None) -> ConstraintSpec | None:
    if isinstance(value, p.JsonObjectFormat):
        return ConstraintSpec.json_object()
    if isinstance(value, p.JsonSchemaFormat):
        return ConstraintSpec.json_schema(value.json_schema.schema_)
    return None


def _schema(value: dict[str, Any] | str, param: str) -> ConstraintSpec:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise InvalidRequest(f"'{param}' is not valid JSON", param=param) from None
        if not isinstance(parsed, dict):
            raise InvalidRequest(f"'{param}' must be a JSON Schema object", param=param)
        value = parsed
    return ConstraintSpec.json_schema(value)


def _choice(choices: list[str]) -> ConstraintSpec:
    """Exactly one of the strings (a Lark alternation of JSON-quoted literals)."""
    return ConstraintSpec.lark("start: " + " | ".join(json.dumps(c) for c in choices))


def constraint(body: p.Sampling) -> tuple[ConstraintSpec | None, str]:
    """The one grammar a request asks for, and the field that named it: `response_format`,
    vLLM's `structured_outputs` (or its older `guided_*` fields), or llama.cpp's top-level
    `json_schema` / `grammar`. Two at once is a 400."""
    found: list[tuple[ConstraintSpec, str]] = []
    fmt = response_format(body.response_format)
    if fmt is not None:
        found.append((fmt, "response_format"))
    so = body.structured_outputs
    if so is not None:
        kinds: list[tuple[ConstraintSpec, str]] = []
        if so.json_ is not None:
            kinds.append((_schema(so.json_, "structured_outputs.json"), "structured_outputs.json"))
        if so.regex is not None:
            kinds.append((ConstraintSpec.regex(so.regex), "structured_outputs.regex"))
        if so.choice is not None:
            kinds.append((_choice(so.choice), "structured_outputs.choice"))
        if so.grammar is not None:
            kinds.append((ConstraintSpec.lark(so.grammar), "structured_outputs.grammar"))
        if so.json_object:
            kinds.append((ConstraintSpec.json_object(), "structured_outputs.json_object"))
        if len(kinds) != 1:
            raise InvalidRequest(
                "'structured_outputs' takes exactly one of json, regex, choice, grammar, "
                "json_object",
                param="structured_outputs",
            )
        found.extend(kinds)
    for value, name, make in (
        (body.guided_json, "guided_json", lambda v, n: _schema(v, n)),
        (body.guided_regex, "guided_regex", lambda v, n: ConstraintSpec.regex(v)),
        (body.guided_choice, "guided_choice", lambda v, n: _choice(v)),
        (body.guided_grammar, "guided_grammar", lambda v, n: ConstraintSpec.lark(v)),
        (body.json_schema, "json_schema", lambda v, n: _schema(v, n)),
        (body.grammar, "grammar", lambda v, n: ConstraintSpec.lark(v)),
    ):
        if value is not None:
            found.append((make(value, name), name))
    if len(found) > 1:
        names = ", ".join(f"'{n}'" for _, n in found)
        raise InvalidRequest(
            f"only one output constraint per request; got {names}", param=found[1][1]
        )
    return found[0] if found else (None, "response_format")


def include_usage(body: p.Sampling) -> bool:
    """`stream_options` only goes with `stream: true`."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


# -- chat completions -------------------------------------------------------------------------


def chat_request(body: p.ChatCompletionRequest) -> Request:
    include_usage(body)
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise InvalidRequest("'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    tools, choice = _tools(body)
    spec, spec_param = constraint(body)
    return Request(
        id=new_id("chatcmpl-"),
        model=body.model,
        chat=tuple(_message(m, f"messages[{i}]") for i, m in enumerate(body.messages)),
        tools=tools,
        tool_choice=choice,
        reasoning="split",
        enable_thinking=False if body.reasoning_effort == "none" else None,
        template_kwargs=body.chat_template_kwargs or {},
        sampling=sampling(body, logprobs=bool(body.logprobs), top_logprobs=top),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=tuple(s for s in body.stop or () if s),
        ignore_eos=bool(body.ignore_eos),
        n=body.n or 1,
        constraint=spec,
        constraint_param=spec_param,
        stream=bool(body.stream),
    )


def _message(m: p.ChatMessageIn, where: str) -> ChatMessage:
    content, images = _content(m.content, f"{where}.content")
    if content is None and m.role in ("system", "developer", "user"):
        raise InvalidRequest(f"'{where}.content' is required", param=f"{where}.content")
    calls = tuple(
        _tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(m.tool_calls or ())
    )
    return ChatMessage(
        role="system" if m.role == "developer" else m.role,
        content=content,
        name=m.name,
        tool_calls=calls,
        tool_call_id=m.tool_call_id,
        reasoning=m.reasoning_content,
        images=images,
    )


def _content(
    content: str | list[Any] | None, where: str
) -> tuple[str | None, tuple[ImageRef, ...]]:
    """The text of a message's content and its images, each at its place in the text (the
    model's frontend decodes them, or refuses them for a text-only model)."""
    if content is None or isinstance(content, str):
        return content, ()
    parts: list[str] = []
    images: list[ImageRef] = []
    at = 0  # characters of text so far: where the next image goes
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if isinstance(part, str | p.TextPart):
            text = part if isinstance(part, str) else part.text
            parts.append(text)
            at += len(text)
        elif part.type in ("image_url", "input_image"):
            images.append(ImageRef(source=_image_url(part, here), offset=at, param=here))
        else:
            raise InvalidRequest(
                f"'{here}': content type {part.type!r} is not supported", param=here
            )
    return "".join(parts), tuple(images)


def _image_url(part: p.MediaPart, where: str) -> str:
    """The url of an `image_url` part: `{"url": ...}` (OpenAI), or the string itself."""
    value = part.image_url
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest(
            f"'{where}.image_url.url' must be a data URL, base64 image data or an http(s) URL",
            param=f"{where}.image_url",
        )
    return url


def _tool_call(call: p.ToolCallIn, where: str) -> ToolCall:
    """An earlier turn's call, its arguments as an object (templates apply `tojson` to them)."""
    args: Any = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise InvalidRequest(
                f"'{where}.function.arguments' is not valid JSON",
                param=f"{where}.function.arguments",
            ) from None
    if not isinstance(args, dict):
        raise InvalidRequest(
            f"'{where}.function.arguments' must be a JSON object",
            param=f"{where}.function.arguments",
        )
    return ToolCall(name=call.function.name, arguments=args, id=call.id)


def _tools(body: p.ChatCompletionRequest) -> tuple[tuple[ToolSpec, ...], ToolChoice]:
    raw = body.tool_choice
    if not body.tools:
        if raw not in (None, "none", "auto"):
            raise InvalidRequest(
                "'tool_choice' requires 'tools' (no tools were given)", param="tool_choice"
            )
        return (), ToolChoice()
    tools = tuple(
        ToolSpec(
            name=t.function.name,
            description=t.function.description,
            parameters=t.function.parameters or {"type": "object", "properties": {}},
        )
        for t in body.tools
    )
    parallel = body.parallel_tool_calls is not False
    if isinstance(raw, p.NamedToolChoice):
        name = raw.function.name
        if name not in [t.name for t in tools]:
            raise InvalidRequest(
                f"'tool_choice' names the function {name!r}, which is not in 'tools'",
                param="tool_choice",
            )
        return tools, ToolChoice(mode="required", name=name, parallel=parallel)
    return tools, ToolChoice(mode=raw or "auto", parallel=parallel)


# -- completions ------------------------------------------------------------------------------


def prompt_specs(raw: str | list[Any], *, param: str) -> tuple[PromptSpec, ...]:
    """The input forms of /v1/completions and /v1/embeddings, one PromptSpec per input."""
    if isinstance(raw, str):
        return (PromptSpec(text=raw),)
    if all(isinstance(t, int) for t in raw):
        return (PromptSpec(token_ids=tuple(raw)),)
    if all(isinstance(x, str) for x in raw):
        return tuple(PromptSpec(text=text) for text in raw)
    return tuple(PromptSpec(token_ids=tuple(ids)) for ids in raw)


def completion_request(body: p.CompletionRequest) -> Request:
    specs = prompt_specs(body.prompt, param="prompt")
    if body.suffix:
        raise InvalidRequest("'suffix' is not supported by this server", param="suffix")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise InvalidRequest(
            f"'best_of' must equal 'n' ({n}): ranking extra samples is not supported",
            param="best_of",
        )
    if len(specs) * n > p.MAX_CHOICES:
        raise InvalidRequest(
            f"{len(specs)} prompts x n={n} is more than {p.MAX_CHOICES} choices", param="prompt"
        )
    include_usage(body)
    logprobs = body.logprobs
    spec, spec_param = constraint(body)
    return Request(
        id=new_id("cmpl-"),
        model=body.model,
        prompts=specs,
        prompt_param="prompt",
        sampling=sampling(body, logprobs=logprobs is not None, top_logprobs=logprobs or 0),
        max_tokens=DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens,
        stop=tuple(s for s in body.stop or () if s),
        ignore_eos=bool(body.ignore_eos),
        n=n,
        constraint=spec,
        constraint_param=spec_param,
        stream=bool(body.stream),
    )
