"""Images through the dialects' converters (fast tier, no model): each image part becomes a
typed `ImageRef` at its place in the turn's text, with the field path its errors name; the
template sees one {"type": "image"} part per image, in order; the generic tool prompt keeps a
tool result's images."""

from __future__ import annotations

import json
from typing import Any

from mlx_server.api.anthropic import convert as anthropic_convert
from mlx_server.api.anthropic.protocol import MessagesRequest
from mlx_server.api.openai import convert as openai_convert
from mlx_server.api.openai.protocol import ChatCompletionRequest
from mlx_server.api.protocol import parse_bytes
from mlx_server.engine.chat_template import with_tool_prompt
from mlx_server.messages import ChatMessage, ImageRef

URL = "data:image/png;base64,AAAA"


def _openai(messages: list[dict[str, Any]]) -> tuple[ChatMessage, ...]:
    body = parse_bytes(ChatCompletionRequest, json.dumps({"messages": messages}))
    chat = openai_convert.chat_request(body).chat
    assert chat is not None
    return chat


def _anthropic(messages: list[dict[str, Any]]) -> tuple[ChatMessage, ...]:
    body = parse_bytes(
        MessagesRequest, json.dumps({"model": "m", "max_tokens": 5, "messages": messages})
    )
    chat = anthropic_convert.messages_request(body).chat
    assert chat is not None
    return chat


def test_openai_parts_keep_their_places() -> None:
    content = [
        {"type": "text", "text": "Compare "},
        {"type": "image_url", "image_url": {"url": URL}},
        {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": "https://x.test/b.png"},
    ]
    (turn,) = _openai([{"role": "user", "content": content}])
    assert turn.content == "Compare and"
    assert [(r.source, r.offset, r.param) for r in turn.images] == [
        (URL, 8, "messages[0].content[1]"),
        ("https://x.test/b.png", 11, "messages[0].content[3]"),
    ]
    assert turn.template_json()["content"] == [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": "and"},
        {"type": "image"},
    ]


def test_anthropic_blocks_become_image_refs() -> None:
    source = {"type": "base64", "media_type": "image/png", "data": "AAAA"}
    image = {"type": "image", "source": source}
    url = {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
    chat = _anthropic(
        [
            {"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, url]},
        ]
    )
    (turn,) = chat  # consecutive user turns merge; the images stay at their places
    assert turn.content == "What is it?\n\nAnd this?"
    assert [(r.source, r.offset) for r in turn.images] == [
        (URL, 0),
        ("https://x.test/a.png", len("What is it?\n\nAnd this?")),
    ]
    assert turn.images[0].param == "messages[0].content[0]"


def test_anthropic_tool_result_images() -> None:
    call = {"type": "tool_use", "id": "t1", "name": "Read", "input": {}}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [image]}
    chat = _anthropic(
        [
            {"role": "user", "content": "Read it"},
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
        ]
    )
    tool = chat[-1]
    assert tool.role == "tool" and len(tool.images) == 1
    assert tool.images[0].param == "messages[2].content[0].content[0]"


def test_generic_tool_prompt_keeps_tool_result_images() -> None:
    tool = ChatMessage(
        role="tool", content="shot.png", tool_call_id="t1", images=(ImageRef(source=URL),)
    )
    second = ChatMessage(role="tool", content="done", tool_call_id="t2")
    out = with_tool_prompt([tool.template_json(), second.template_json()], None)
    (turn,) = out
    assert turn["role"] == "user"
    kinds = [p["type"] for p in turn["content"]]
    assert kinds.count("image") == 1
    text = "".join(p.get("text", "") for p in turn["content"])
    assert "shot.png" in text and "done" in text and text.count("<tool_response>") == 2


def test_text_only_turns_stay_strings() -> None:
    (turn,) = _openai([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert turn.images == () and turn.template_json()["content"] == "hi"
