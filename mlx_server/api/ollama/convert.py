"""Ollama's `/api/chat` and `/api/generate` requests (typed, `protocol.py`), converted into the
chat-completions shape the generation path reads (and its completions shape for raw
`/api/generate`); the OpenAI request model then checks it once more and `openai.convert` makes
the internal request.

Ollama puts sampling under `options` (`num_predict`, `repeat_penalty`, ...), structured output
in `format` (`"json"` or a JSON Schema), reasoning in `think`, and images as base64 strings
beside a message's text. Pure.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from ...errors import InvalidRequest
from . import protocol as p

_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repetition_penalty",
}
_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", "image/webp"),
)


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _image_part(value: str, param: str) -> dict[str, Any]:
    """A base64 image of an Ollama message as a chat `image_url` part with a data URL (the media
    type sniffed from the first bytes; the image decoder checks the rest)."""
    try:
        head = base64.b64decode(value[:64] + "=" * (-len(value[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"'{param}' is not valid base64", param) from None
    media = next((kind for magic, kind in _MAGIC if head.startswith(magic)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{value}"}}


def options(raw: p.Options | None) -> dict[str, Any]:
    """`options` -> chat sampling fields (`num_predict` -> `max_tokens`); `stop` is `stops`'s."""
    if raw is None:
        return {}
    out: dict[str, Any] = {}
    for key, target in _SAMPLING.items():
        value = getattr(raw, key)
        if value is not None:
            out[target] = value
    if raw.num_predict is not None and raw.num_predict > 0:  # -1, -2: until the context is full
        out["max_tokens"] = raw.num_predict
    return out


def stops(raw: p.Options | None) -> tuple[str, ...]:
    """`options.stop`, set on the internal request directly (Ollama takes more than OpenAI's
    four)."""
    return tuple(s for s in (raw.stop or ()) if s) if raw is not None else ()


def response_format(raw: p.Format | None) -> dict[str, Any] | None:
    """`format`: "json" -> any JSON object; a schema object -> that schema; "" -> none."""
    if raw is None or raw == "":
        return None
    if raw == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": raw}}


def _arguments(call: p.ToolCall, where: str) -> dict[str, Any]:
    args: Any = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = None
    if not isinstance(args, dict):
        param = f"{where}.function.arguments"
        raise _bad(f"'{param}' must be an object", param)
    return args


def _message(m: p.Message, where: str, call_ids: list[str]) -> dict[str, Any]:
    content = m.content or ""
    body: Any = content
    if m.images:
        parts = [_image_part(img, f"{where}.images[{j}]") for j, img in enumerate(m.images)]
        body = [*parts, {"type": "text", "text": content}]
    message: dict[str, Any] = {"role": m.role, "content": body}
    if m.role == "assistant":
        if m.thinking:
            message["reasoning_content"] = m.thinking
        converted = []
        for j, call in enumerate(m.tool_calls or ()):
            call_id = call.id if call.id else f"call_{len(call_ids)}"
            call_ids.append(call_id)
            arguments = _arguments(call, f"{where}.tool_calls[{j}]")
            converted.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.dumps(arguments)},
                }
            )
        if converted:
            message["tool_calls"] = converted
            if not content:
                message["content"] = None
    elif m.role == "tool":
        # Ollama answers calls in order and names the tool, not the call: pair each result
        # with the oldest call still unanswered.
        message["tool_call_id"] = m.tool_call_id or (call_ids.pop(0) if call_ids else "call_0")
    return message


def _think(raw: p.Think | None) -> dict[str, Any]:
    """`think`: true/false, or an effort ("low", "medium", "high")."""
    if raw is None:
        return {}
    if isinstance(raw, bool):
        return {"chat_template_kwargs": {"enable_thinking": raw}}
    return {"reasoning_effort": raw}


def chat_body(body: p.ChatRequest) -> dict[str, Any]:
    """An `/api/chat` request as a chat-completions body."""
    call_ids: list[str] = []
    messages = [_message(m, f"messages[{i}]", call_ids) for i, m in enumerate(body.messages or ())]
    chat: dict[str, Any] = {"model": body.model, "messages": messages, **options(body.options)}
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": t.function.model_dump(exclude_none=True)}
            for t in body.tools
        ]
    fmt = response_format(body.format)
    if fmt is not None:
        chat["response_format"] = fmt
    chat.update(_think(body.think))
    chat["stream"] = body.stream is not False
    return chat


def generate_body(body: p.GenerateRequest) -> dict[str, Any]:
    """An `/api/generate` request: a chat of one user turn (with `system`) through the model's
    template, or, with `raw: true`, the prompt as is (a completions body, `raw` set)."""
    if body.suffix:
        raise _bad("'suffix' (fill-in-the-middle) is not supported", "suffix")
    if body.template:
        raise _bad("'template' overrides are not supported", "template")
    prompt = body.prompt or ""
    common = {"model": body.model, **options(body.options), "stream": body.stream is not False}
    fmt = response_format(body.format)
    if fmt is not None:
        common["response_format"] = fmt
    if body.raw:
        if body.images:
            raise _bad("'images' cannot be used with 'raw'", "images")
        return {**common, "prompt": prompt, "raw": True}
    messages: list[dict[str, Any]] = []
    if body.system is not None:
        messages.append({"role": "system", "content": body.system})
    content: Any = prompt
    if body.images:
        parts = [_image_part(img, f"images[{j}]") for j, img in enumerate(body.images)]
        content = [*parts, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    return {**common, "messages": messages, **_think(body.think)}


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def keep_alive(value: p.KeepAlive | None) -> float | None:
    """Seconds: a number, or a duration such as "5m", "1h30m" (negative: forever)."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        return sum(float(n) * _UNITS[u] for n, u in parts)
    raise _bad(p.KEEP_ALIVE_MESSAGE, "keep_alive")
