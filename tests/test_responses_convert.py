"""Responses API requests converted into the chat shape: items, tools, tool choice, formats,
and a 400 with the field's path for each malformed piece."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlx_server.api.responses.convert import (
    decrypt_reasoning,
    encrypt_reasoning,
    to_chat,
)
from mlx_server.errors import InvalidRequest

CODEX_LIKE: dict[str, Any] = {
    "model": "m",
    "instructions": "You are Codex.",
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "A"}]},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "B"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "env"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "ls"}]},
    ],
    "tools": [
        {
            "type": "function",
            "name": "exec_command",
            "strict": False,
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
        },
        {
            "type": "namespace",
            "name": "mcp",
            "description": "d",
            "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}],
        },
        {
            "type": "custom",
            "name": "apply_patch",
            "description": "patch",
            "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"},
        },
        {"type": "web_search"},
    ],
    "tool_choice": "auto",
}


def test_codex_like_request() -> None:
    shape = to_chat(CODEX_LIKE)
    assert shape.messages[0] == {"role": "system", "content": "You are Codex.\n\nA\n\nB"}
    assert [m["role"] for m in shape.messages] == ["system", "user", "user"]
    names = [t["function"]["name"] for t in shape.tools]
    assert names == ["exec_command", "mcp__read", "apply_patch"]
    assert shape.skipped_tools == ("web_search",)
    assert shape.tool_map["mcp__read"].namespace == "mcp"
    assert shape.tool_map["apply_patch"].kind == "custom"
    assert "apply_patch" in shape.custom_grammars


def test_calls_outputs_and_reasoning_in_history() -> None:
    secret = encrypt_reasoning("I should list files")
    shape = to_chat(
        {
            "input": [
                {"role": "user", "content": "hi"},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": secret},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "exec_command",
                    "arguments": '{"cmd":"ls"}',
                },
                {
                    "type": "custom_tool_call",
                    "call_id": "c2",
                    "name": "apply_patch",
                    "input": "*** Begin Patch",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
                {
                    "type": "custom_tool_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "ok"}],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "done", "annotations": []}],
                },
            ]
        }
    )
    _user, assistant, out1, out2, final = shape.messages
    assert assistant["reasoning_content"] == "I should list files"
    calls = assistant["tool_calls"]
    assert [c["id"] for c in calls] == ["c1", "c2"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"input": "*** Begin Patch"}
    assert out1 == {"role": "tool", "tool_call_id": "c1", "content": "a.txt"}
    assert out2["content"] == "ok"
    assert final == {"role": "assistant", "content": "done"}


def test_history_drops_old_instructions() -> None:
    history = [
        {"role": "system", "content": "old"},
        {"role": "user", "content": "q1"},
        {
            "type": "message",
            "role": "assistant",
            "id": "m",
            "status": "completed",
            "content": [{"type": "output_text", "text": "a1", "annotations": []}],
        },
    ]
    shape = to_chat({"input": "q2", "instructions": "new"}, history)
    assert shape.messages == [
        {"role": "system", "content": "new"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]


def test_formats_and_choices() -> None:
    shape = to_chat(
        {
            "input": "x",
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "r",
                    "schema": {"type": "object"},
                    "strict": True,
                }
            },
            "tools": CODEX_LIKE["tools"],
            "tool_choice": {"type": "custom", "name": "apply_patch"},
        }
    )
    assert shape.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "r", "schema": {"type": "object"}, "strict": True},
    }
    assert shape.tool_choice == {"type": "function", "function": {"name": "apply_patch"}}
    assert to_chat({"input": "x", "text": {"format": {"type": "text"}}}).response_format is None


def test_encrypted_round_trip() -> None:
    assert decrypt_reasoning(encrypt_reasoning("é x"), "p") == "é x"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": 3}, "input"),
        ({"input": [{"type": "bogus"}]}, "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"type": "reasoning", "summary": [], "encrypted_content": "zzz"}]},
            "input[0].encrypted_content",
        ),
        ({"input": "x", "tools": [{"type": "teleport"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        (
            {
                "input": "x",
                "tools": [{"type": "web_search"}],
                "tool_choice": {"type": "web_search"},
            },
            "tool_choice",
        ),
        ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        (
            {
                "input": "x",
                "tools": [
                    {
                        "type": "custom",
                        "name": "c",
                        "format": {"type": "grammar", "syntax": "peg", "definition": "x"},
                    }
                ],
            },
            "tools[0].format.syntax",
        ),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        to_chat(body)
    assert excinfo.value.param == param
