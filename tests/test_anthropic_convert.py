"""The Anthropic dialect as clients send it now, parse + convert (no server): mid-conversation
system entries, billing headers, adaptive thinking and effort, structured output, thinking
blocks in history, unknown fields; and the errors for malformed input, in Anthropic's shape
through the app's error handlers (`quart` test client, no model needed for a 400 that comes
before the model is resolved)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlx_server.api.anthropic import convert
from mlx_server.api.anthropic.protocol import CountTokensRequest, MessagesRequest
from mlx_server.api.anthropic.render import model_info_json, model_list_json, usage_json
from mlx_server.api.protocol import parse_bytes
from mlx_server.errors import InvalidRequest
from mlx_server.generation import Request
from mlx_server.messages import ConstraintSpec

USER = {"role": "user", "content": "hi"}


def request_of(**fields: Any) -> Request:
    body = {"model": "m", "max_tokens": 8, "messages": [USER], **fields}
    return convert.messages_request(parse_bytes(MessagesRequest, json.dumps(body)))


def roles(request: Request) -> list[tuple[str, str | None]]:
    return [(m.role, m.content) for m in request.chat or ()]


def test_system_and_developer_entries_stay_where_they_stand() -> None:
    request = request_of(
        system="top",
        messages=[
            USER,
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "use tools"}]},
            {"role": "user", "content": "again"},
        ],
    )
    assert roles(request) == [
        ("system", "top"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("system", "be brief\n\nuse tools"),  # consecutive system entries merge
        ("user", "again"),
    ]


def test_billing_header_blocks_are_left_out() -> None:
    request = request_of(
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197; cch=ab12;"},
            {"type": "text", "text": "You are Claude Code."},
        ]
    )
    assert roles(request)[0] == ("system", "You are Claude Code.")
    only_header = request_of(system=[{"type": "text", "text": "x-anthropic-billing-header: x"}])
    assert roles(only_header)[0] == ("user", "hi")


def test_thinking_blocks_become_the_turns_reasoning() -> None:
    thinking = {"type": "thinking", "thinking": "Paris, surely.", "signature": "sig"}
    redacted = {"type": "redacted_thinking", "data": "opaque"}
    call = {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}
    request = request_of(
        messages=[
            USER,
            {"role": "assistant", "content": [thinking, redacted, {"type": "text", "text": "ok"}]},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": [thinking, call]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
        ],
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
    )
    assert request.chat is not None
    chat = request.chat
    assert chat[1].reasoning == "Paris, surely." and chat[1].content == "ok"
    assert chat[3].reasoning == "Paris, surely." and chat[3].tool_calls[0].name == "f"
    assert chat[1].template_json()["reasoning_content"] == "Paris, surely."


@pytest.mark.parametrize(
    ("thinking", "enable", "reasoning"),
    [
        (None, False, "drop"),
        ({"type": "disabled"}, False, "drop"),
        ({"type": "enabled", "budget_tokens": 1024}, True, "split"),
        ({"type": "adaptive"}, True, "split"),
        ({"type": "adaptive", "display": "summarized"}, True, "split"),
        ({"type": "adaptive", "display": "omitted"}, True, "drop"),
        ({"type": "between_tools"}, False, "split"),
    ],
)
def test_thinking_modes(thinking: dict[str, Any] | None, enable: bool, reasoning: str) -> None:
    request = request_of(**({"thinking": thinking} if thinking else {}))
    assert request.enable_thinking is enable
    assert request.reasoning == reasoning


@pytest.mark.parametrize(
    ("effort", "kwarg"),
    [("low", "low"), ("medium", "medium"), ("high", "high"), ("xhigh", "high"), ("max", "high")],
)
def test_effort_is_the_templates_reasoning_effort(effort: str, kwarg: str) -> None:
    request = request_of(thinking={"type": "adaptive"}, output_config={"effort": effort})
    assert dict(request.template_kwargs) == {"reasoning_effort": kwarg}
    assert dict(request_of().template_kwargs) == {}


def test_output_format_is_a_json_schema_constraint() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "schema": schema}
    for fields, param in (
        ({"output_config": {"format": fmt}}, "output_config.format.schema"),
        ({"output_format": fmt}, "output_format.schema"),
        ({"output_config": {"format": fmt, "effort": "low"}}, "output_config.format.schema"),
    ):
        request = request_of(**fields)
        assert request.constraint == ConstraintSpec.json_schema(schema)
        assert request.constraint_param == param
    assert request_of().constraint is None


def test_unknown_top_level_fields_are_ignored() -> None:
    request = request_of(
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        container="c",
        mcp_servers=[],
    )
    assert roles(request) == [("user", "hi")]
    count = CountTokensRequest.model_validate(
        {"model": "m", "messages": [USER], "context_management": {}, "output_config": {}}
    )
    assert count.output_config is not None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"thinking": {"type": "adaptive", "display": "loud"}}, "thinking.display"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
        (
            {"output_config": {"format": {"type": "regex", "schema": {}}}},
            "output_config.format.type",
        ),
        ({"output_format": {"type": "json_schema", "schema": "{}"}}, "output_format.schema"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [USER, {"role": "system", "content": [{"type": "image", "source": {}}]}]},
            "messages[1].content[0]",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "system",
                        "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}],
                    },
                ]
            },
            "messages[1].content[0]",
        ),
        ({"messages": [USER, {"role": "system", "content": ""}]}, "messages[1].content"),
    ],
)
def test_malformed_fields_are_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [USER], **fields}
    with pytest.raises(InvalidRequest) as info:
        convert.messages_request(parse_bytes(MessagesRequest, json.dumps(body)))
    assert info.value.status == 400
    assert info.value.param == param, info.value.message


def test_usage_splits_the_prompt_into_cached_and_not() -> None:
    assert usage_json(100, 5, 80) == {
        "input_tokens": 20,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 80,
    }
    assert usage_json(10, 1)["cache_read_input_tokens"] == 0
    assert usage_json(10, 1, 50)["input_tokens"] == 0  # never negative


def test_model_shapes_validate_against_the_sdk_types() -> None:
    """Anthropic's `ModelInfo` and its page, strictly (the SDK's models, closed)."""
    import anthropic.types as at
    import attrs
    import jsonschema

    from mlx_server.testing.schemas import Contract, build

    @attrs.frozen
    class Slot:
        name: str
        created: int = 1_750_000_000
        frontend: Any = None

    info = model_info_json(Slot("smol"))  # type: ignore[arg-type]
    jsonschema.validate(info, build(Contract(name="anthropic.ModelInfo", source=at.ModelInfo)))
    assert info["created_at"] == "2025-06-15T15:06:40Z"
    page = model_list_json([Slot("a"), Slot("b")])  # type: ignore[list-item]
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("a", "b", False)
    assert [m["id"] for m in page["data"]] == ["a", "b"]
    assert model_list_json([])["first_id"] is None
