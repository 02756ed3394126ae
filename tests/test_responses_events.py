"""The Responses API event writer: event order, sequence numbers, and every event and body
valid for the official `openai` package's types."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from mlx_server.api.responses.events import ResponseWriter, ToolRef, custom_input, usage_body
from mlx_server.messages import (
    Failed,
    Finished,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    Usage,
)
from mlx_server.testing import openapi

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
BASE = {
    "model": "tiny",
    "instructions": None,
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "temperature": None,
    "top_p": None,
    "metadata": {},
}
USAGE = usage_body(10, 5, 4, 0)


def _run(events: list[StreamEvent], finish: Finished | Failed, **kw: Any) -> list[dict[str, Any]]:
    writer = ResponseWriter(response_id="resp_1", base=BASE, **kw)
    out = list(writer.start())
    for event in events:
        out.extend(writer.feed(event))
    if isinstance(finish, Finished):
        out.extend(writer.finish(finish, usage=USAGE))
    else:
        out.extend(writer.fail(finish))
    for event in out:
        EVENT.validate_python(event, strict=False)
        openapi.validate("openai.ResponseStreamEvent", event)  # the strict contract too
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def _done(reason: str = "stop") -> Finished:
    return Finished(finish_reason=reason, usage=Usage(prompt_tokens=10, completion_tokens=5))  # type: ignore[arg-type]


def test_text_then_completed() -> None:
    out = _run([TextDelta(text="Hel"), TextDelta(text="lo")], _done())
    assert [e["type"] for e in out] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(out[-1]["response"])
    assert final.output_text == "Hello"
    assert final.status == "completed"
    assert final.usage is not None and final.usage.input_tokens_details.cached_tokens == 4


def test_reasoning_then_text_then_call_are_separate_items_in_order() -> None:
    events: list[StreamEvent] = [
        ReasoningDelta(text="think"),
        TextDelta(text="ok"),
        ToolCallStart(index=0, call_id="abc", name="exec_command"),
        ToolCallArgsDelta(index=0, arguments='{"cmd":'),
        ToolCallArgsDelta(index=0, arguments=' "ls"}'),
    ]
    out = _run(events, _done())
    final = Response.model_validate(out[-1]["response"])
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message", "function_call"]
    call = final.output[2]
    assert call.type == "function_call"
    assert call.arguments == '{"cmd": "ls"}' and call.call_id == "call_abc"
    done = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert done[0]["arguments"] == '{"cmd": "ls"}'
    deltas = [e["delta"] for e in out if e["type"] == "response.reasoning_text.delta"]
    assert deltas == ["think"]


def test_custom_tool_and_namespace() -> None:
    tools = {
        "apply_patch": ToolRef(kind="custom", name="apply_patch"),
        "mcp.read": ToolRef(kind="function", name="read", namespace="mcp"),
    }
    events: list[StreamEvent] = [
        ToolCallStart(index=0, call_id="a", name="apply_patch"),
        ToolCallArgsDelta(index=0, arguments='{"input": "*** Begin Patch\\n"}'),
        ToolCallStart(index=1, call_id="b", name="mcp.read"),
        ToolCallArgsDelta(index=1, arguments="{}"),
    ]
    out = _run(events, _done(), tools=tools)
    final = Response.model_validate(out[-1]["response"])
    custom, fn = final.output
    assert custom.type == "custom_tool_call" and custom.input == "*** Begin Patch\n"
    assert fn.type == "function_call" and fn.name == "read" and fn.namespace == "mcp"
    types = [e["type"] for e in out]
    assert types.index("response.custom_tool_call_input.delta") < types.index(
        "response.custom_tool_call_input.done"
    )


def test_length_is_incomplete_and_failure_is_failed() -> None:
    out = _run([TextDelta(text="x")], _done("length"))
    assert out[-1]["type"] == "response.incomplete"
    assert out[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    out = _run([TextDelta(text="x")], Failed(message="boom"))
    assert out[-1]["type"] == "response.failed"
    assert out[-1]["response"]["error"]["code"] == "server_error"


def test_non_streaming_final_equals_streamed_final() -> None:
    events: list[StreamEvent] = [ReasoningDelta(text="r"), TextDelta(text="t")]
    streamed = _run(events, _done())[-1]["response"]
    writer = ResponseWriter(response_id="resp_1", base=BASE, created_at=streamed["created_at"])
    for event in events:
        list(writer.feed(event))
    body = writer.final(_done(), usage=USAGE)
    Response.model_validate(body)
    strip = {"completed_at"}
    ids = lambda b: [{k: v for k, v in i.items() if k != "id"} for i in b["output"]]  # noqa: E731
    assert ids(body) == ids(streamed)
    assert {k: v for k, v in body.items() if k not in strip | {"output"}} == {
        k: v for k, v in streamed.items() if k not in strip | {"output"}
    }


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"input": "abc"}', "abc"),
        ('{"patch": "x"}', "x"),
        ("not json", "not json"),
        ("", ""),
    ],
)
def test_custom_input(arguments: str, expected: str) -> None:
    assert custom_input(arguments) == expected


def test_store_is_byte_bounded_lru() -> None:
    from mlx_server.api.responses.store import ResponseStore, StoredResponse

    def record(text: str) -> StoredResponse:
        return StoredResponse.of({"id": text, "output": [{"t": text}]}, [{"x": text}])

    one = record("a" * 50)
    store = ResponseStore(max_bytes=one.nbytes * 2 + 10)
    assert store.put("a", one)
    assert store.put("b", record("b" * 50))
    assert store.get("a") is not None  # a is now the most recently used
    assert store.put("c", record("c" * 50))
    assert store.get("b") is None and store.get("a") is not None and store.evictions == 1
    assert store.nbytes <= store.max_bytes
    assert not store.put("huge", record("h" * 10_000))
    assert store.get("huge") is None
    assert store.delete("a") and not store.delete("a")
    assert store.get("c") is not None and store.get("c").history()[-1] == {"t": "c" * 50}  # type: ignore[union-attr]


def test_strict_contract_rejects_broken_events() -> None:
    good = _run([TextDelta(text="x")], _done())
    openapi.validate("openai.Response", good[-1]["response"])
    missing = {k: v for k, v in good[4].items() if k != "sequence_number"}
    wrong_status = {**good[-1]["response"], "status": "done"}
    extra = {**good[-1]["response"], "surprise": 1}
    for broken, name in (
        (missing, "openai.ResponseStreamEvent"),
        (wrong_status, "openai.Response"),
        (extra, "openai.Response"),
    ):
        with pytest.raises(AssertionError):
            openapi.validate(name, broken)
