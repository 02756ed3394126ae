"""Ollama's `/api/chat` and `/api/generate` requests, converted into the chat-completions shape
the generation path reads (and its completions shape for raw `/api/generate`).

Ollama puts sampling under `options` (`num_predict`, `temperature`, `top_p`, `top_k`, `min_p`,
`seed`, `stop`, `repeat_penalty`, `presence_penalty`, `frequency_penalty`), structured output in
`format` (`"json"` or a JSON Schema), reasoning in `think`, and images as base64 strings beside a
message's text. Options this server has no use for (`num_ctx`, `num_gpu`, `mirostat`, ...) are
accepted and ignored, as Ollama itself ignores options a runner does not support. Pure.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from ...errors import InvalidRequest

_ROLES = {"system", "user", "assistant", "tool"}
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


def _image_part(value: Any, param: str) -> dict[str, Any]:
    """A base64 image of an Ollama message as a chat `image_url` part with a data URL (the media
    type sniffed from the first bytes; the image decoder checks the rest)."""
    if not isinstance(value, str) or not value:
        raise _bad(f"'{param}' must be a base64 string", param)
    try:
        head = base64.b64decode(value[:64] + "=" * (-len(value[:64]) % 4), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"'{param}' is not valid base64", param) from exc
    media = next((kind for magic, kind in _MAGIC if head.startswith(magic)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{value}"}}


def options(raw: Any) -> dict[str, Any]:
    """`options` -> chat sampling fields (`num_predict` -> `max_tokens`, `stop`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("'options' must be an object", "options")
    out: dict[str, Any] = {}
    for key, target in _SAMPLING.items():
        if raw.get(key) is not None:
            out[target] = raw[key]
    predict = raw.get("num_predict")
    if predict is not None:
        if not isinstance(predict, int) or isinstance(predict, bool):
            raise _bad("'options.num_predict' must be an integer", "options.num_predict")
        if predict > 0:  # -1 and -2 mean "until the context is full" in Ollama
            out["max_tokens"] = predict
    stop = raw.get("stop")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("'options.stop' must be an array of strings", "options.stop")
        out["stop"] = stop
    return out


def response_format(raw: Any) -> dict[str, Any] | None:
    """`format`: "json" -> any JSON object; a schema object -> that schema; "" -> none."""
    if raw is None or raw == "":
        return None
    if raw == "json":
        return {"type": "json_object"}
    if isinstance(raw, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": raw}}
    raise _bad("'format' must be \"json\" or a JSON Schema object", "format")


def _message(raw: Any, where: str, call_ids: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad(f"'{where}' must be an object", where)
    role = raw.get("role")
    if role not in _ROLES:
        raise _bad(f"'{where}.role' must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
    content = raw.get("content") or ""
    if not isinstance(content, str):
        raise _bad(f"'{where}.content' must be a string", f"{where}.content")
    images = raw.get("images") or []
    if not isinstance(images, list):
        raise _bad(f"'{where}.images' must be an array", f"{where}.images")
    body: Any = content
    if images:
        parts = [_image_part(img, f"{where}.images[{j}]") for j, img in enumerate(images)]
        body = [*parts, {"type": "text", "text": content}]
    message: dict[str, Any] = {"role": role, "content": body}
    if role == "assistant":
        if isinstance(raw.get("thinking"), str) and raw["thinking"]:
            message["reasoning_content"] = raw["thinking"]
        calls = raw.get("tool_calls") or []
        if not isinstance(calls, list):
            raise _bad(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
        converted = []
        for j, call in enumerate(calls):
            cw = f"{where}.tool_calls[{j}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _bad(f"'{cw}.function.name' must be a string", f"{cw}.function")
            arguments = function.get("arguments") or {}
            if not isinstance(arguments, dict):
                raise _bad(f"'{cw}.function.arguments' must be an object", f"{cw}.function")
            given = call.get("id")
            call_id = given if isinstance(given, str) else f"call_{len(call_ids)}"
            call_ids.append(call_id)
            converted.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": function["name"], "arguments": json.dumps(arguments)},
                }
            )
        if converted:
            message["tool_calls"] = converted
            if not content:
                message["content"] = None
    elif role == "tool":
        # Ollama answers calls in order and names the tool, not the call: pair each result
        # with the oldest call still unanswered.
        message["tool_call_id"] = (
            raw["tool_call_id"]
            if isinstance(raw.get("tool_call_id"), str)
            else (call_ids.pop(0) if call_ids else "call_0")
        )
    return message


def _tools(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad("'tools' must be an array", "tools")
    out = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"'tools[{i}].function.name' must be a string", f"tools[{i}].function")
        out.append({"type": "function", "function": function})
    return out


def _think(raw: Any) -> dict[str, Any]:
    """`think`: true/false, or an effort ("low", "medium", "high")."""
    if raw is None:
        return {}
    if isinstance(raw, bool):
        return {"chat_template_kwargs": {"enable_thinking": raw}, "reasoning": raw}
    if raw in ("low", "medium", "high"):
        return {"reasoning_effort": raw, "reasoning": True}
    raise _bad("'think' must be a boolean or one of 'low', 'medium', 'high'", "think")


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """An `/api/chat` request as a chat-completions body (plus `reasoning`: whether the client
    asked to see thinking, which Ollama returns as `message.thinking`)."""
    messages = body.get("messages")
    if messages is None:
        messages = []
    if not isinstance(messages, list):
        raise _bad("'messages' must be an array", "messages")
    call_ids: list[str] = []
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "messages": [_message(m, f"messages[{i}]", call_ids) for i, m in enumerate(messages)],
        **options(body.get("options")),
    }
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    fmt = response_format(body.get("format"))
    if fmt is not None:
        chat["response_format"] = fmt
    chat.update(_think(body.get("think")))
    return chat


def generate_body(body: dict[str, Any]) -> dict[str, Any]:
    """An `/api/generate` request: a chat of one user turn (with `system`) through the model's
    template, or, with `raw: true`, the prompt as is (a completions body, `raw` set)."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string", "prompt")
    if body.get("suffix"):
        raise _bad("'suffix' (fill-in-the-middle) is not supported", "suffix")
    if body.get("template"):
        raise _bad("'template' overrides are not supported", "template")
    common = {"model": body.get("model"), **options(body.get("options"))}
    fmt = response_format(body.get("format"))
    if body.get("raw"):
        if body.get("images"):
            raise _bad("'images' cannot be used with 'raw'", "images")
        return {**common, "prompt": prompt, "raw": True}
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise _bad("'system' must be a string", "system")
        messages.append({"role": "system", "content": system})
    images = body.get("images") or []
    if not isinstance(images, list):
        raise _bad("'images' must be an array", "images")
    content: Any = prompt
    if images:
        parts = [_image_part(img, f"images[{j}]") for j, img in enumerate(images)]
        content = [*parts, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    chat: dict[str, Any] = {**common, "messages": messages}
    if fmt is not None:
        chat["response_format"] = fmt
    chat.update(_think(body.get("think")))
    return chat
