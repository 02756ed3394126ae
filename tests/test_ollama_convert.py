"""Ollama requests converted into the chat shape, and Ollama's chunks rendered from stream
events (validated with the official `ollama` client's response types where installed)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from mlx_server.api.ollama import convert
from mlx_server.api.ollama import protocol as p
from mlx_server.api.ollama.render import OllamaWriter, timestamp
from mlx_server.api.protocol import parse_object
from mlx_server.errors import InvalidRequest
from mlx_server.messages import (
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """Parse as the route does, then convert."""
    return convert.chat_body(parse_object(p.ChatRequest, {"model": "m", **body}))


def generate_body(body: dict[str, Any]) -> dict[str, Any]:
    return convert.generate_body(parse_object(p.GenerateRequest, body))


def test_chat_body_maps_options_format_think_images_and_tools() -> None:
    body = chat_body(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "look", "images": [PNG]},
                {
                    "role": "assistant",
                    "content": "",
                    "thinking": "hmm",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
                },
                {"role": "tool", "content": "42", "tool_name": "f"},
            ],
            "options": {
                "temperature": 0.1,
                "num_predict": 7,
                "stop": ["x"],
                "num_ctx": 4096,
                "repeat_penalty": 1.1,
            },
            "format": {"type": "object"},
            "think": True,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        }
    )
    assert body["temperature"] == 0.1 and body["max_tokens"] == 7 and "stop" not in body
    assert body["repetition_penalty"] == 1.1 and "num_ctx" not in body
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    user = body["messages"][1]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assistant, tool = body["messages"][2:]
    assert assistant["reasoning_content"] == "hmm" and assistant["content"] is None
    call = assistant["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"a": 1}
    assert tool["tool_call_id"] == call["id"]
    assert body["chat_template_kwargs"] == {"enable_thinking": True}


def test_generate_body() -> None:
    body = generate_body({"model": "m", "prompt": "hi", "system": "s", "format": "json"})
    assert body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
    ]
    assert body["response_format"] == {"type": "json_object"}
    raw = generate_body({"model": "m", "prompt": "<s>hi", "raw": True})
    assert raw["prompt"] == "<s>hi" and raw["raw"] is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": {}}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "images": [7]}]}, "messages[0].images[0]"),
        ({"messages": [], "options": {"num_predict": "many"}}, "options.num_predict"),
        ({"messages": [], "format": "yaml"}, "format"),
        ({"messages": [], "think": "extreme"}, "think"),
        ({"messages": [], "tools": [{"function": {}}]}, "tools[0].function.name"),
        ({"messages": [], "options": {"temperature": 3}}, "options.temperature"),
        ({"messages": [], "options": {"stop": "x"}}, "options.stop"),
        ({"messages": [], "stream": "yes"}, "stream"),
        ({"messages": [], "keep_alive": [1]}, "keep_alive"),
        ({"model": "", "messages": []}, "model"),
        (
            {"messages": [{"role": "user", "content": "x", "images": ["not base64!"]}]},
            "messages[0].images[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_chat_bodies(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        chat_body(body)
    assert excinfo.value.param == param
    assert excinfo.value.message.startswith(f"'{param}'"), excinfo.value.message


def test_keep_alive_durations() -> None:
    assert convert.keep_alive(None) is None and convert.keep_alive(0) == 0.0
    assert convert.keep_alive("0") == 0.0 and convert.keep_alive(-1) == -1.0
    assert convert.keep_alive("5m") == 300.0 and convert.keep_alive("1h30m") == 5400.0
    assert convert.keep_alive("250ms") == 0.25 and convert.keep_alive("-1s") == -1.0
    for bad in ("5 minutes", "m", "", "5x", "1h 30m"):
        with pytest.raises(InvalidRequest) as excinfo:
            convert.keep_alive(bad)
        assert excinfo.value.param == "keep_alive"


def test_stops_go_beyond_openais_four() -> None:
    body = parse_object(p.ChatRequest, {"model": "m", "options": {"stop": list("abcdef")}})
    assert convert.stops(body.options) == tuple("abcdef")
    assert "stop" not in convert.chat_body(body)


def test_writer_chat_stream_and_whole() -> None:
    import ollama as ollama_types

    writer = OllamaWriter(model="m", mode="chat", started=time.monotonic())
    chunks = [
        *writer.feed(ReasoningDelta(text="t")),
        *writer.feed(TextDelta(text="Hi")),
        *writer.feed(ToolCallStart(index=0, call_id="ab", name="f")),
        *writer.feed(ToolCallArgsDelta(index=0, arguments='{"x": ')),
        *writer.feed(ToolCallArgsDelta(index=0, arguments="2}")),
    ]
    done = Finished(finish_reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=4))
    chunks.extend(writer.finish(done))
    parsed = [ollama_types.ChatResponse.model_validate(c) for c in chunks]
    assert parsed[0].message.thinking == "t" and parsed[1].message.content == "Hi"
    (call,) = parsed[2].message.tool_calls or []
    assert call.function.arguments == {"x": 2}
    last = parsed[-1]
    assert last.done and last.done_reason == "stop" and last.eval_count == 4
    assert last.prompt_eval_count == 3 and (last.total_duration or 0) >= 0
    whole = ollama_types.ChatResponse.model_validate(writer.done(done, whole=True))
    assert whole.message.content == "Hi" and whole.message.thinking == "t"


def test_timestamp_shape() -> None:
    stamp = timestamp(0.5)
    assert stamp == "1970-01-01T00:00:00.500000000Z"
