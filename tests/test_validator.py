"""The response validator (mlx_server.testing.openapi / schemas) and the stream-order checkers
(mlx_server.testing.streams) reject what they must.

Each good body below has the shape the server sends; each bad one changes one thing (a missing
field, a wrong type, an unknown enum value, a stray key, an event out of order) and must be
refused. No server, no model: these run in the fast tier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from mlx_server.testing import openapi, schemas, streams
from mlx_server.testing.streams import StreamOrderError

Body = dict[str, Any]

# --------------------------------------------------------------------------- good bodies

USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 3,
    "total_tokens": 12,
    "prompt_tokens_details": {"cached_tokens": 0},
}
ENVELOPE = {"id": "chatcmpl-1", "created": 1700000000, "model": "m", "system_fingerprint": "fp"}

CHAT: Body = {
    **ENVELOPE,
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}

CHAT_TOOLS: Body = {
    **CHAT,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "reasoning_content": "Call the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "logprobs": {
                "content": [
                    {
                        "token": "P",
                        "logprob": -0.1,
                        "bytes": [80],
                        "top_logprobs": [{"token": "P", "logprob": -0.1, "bytes": [80]}],
                    }
                ],
                "refusal": None,
            },
            "finish_reason": "tool_calls",
        }
    ],
}


def chunk(delta: Body, finish: str | None = None, index: int = 0, **extra: Any) -> Body:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**ENVELOPE, "object": "chat.completion.chunk", "choices": [choice], **extra}


USAGE_CHUNK: Body = {**ENVELOPE, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}

CHAT_STREAM: list[Body] = [
    chunk({"role": "assistant", "content": ""}, usage=None),
    chunk({"content": "Par"}, usage=None),
    chunk({"content": "is."}, usage=None),
    chunk({}, "stop", usage=None),
    USAGE_CHUNK,
]

TOOL_STREAM: list[Body] = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Call it."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({}, "tool_calls"),
]

COMPLETION: Body = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1700000000,
    "model": "m",
    "system_fingerprint": "fp",
    "choices": [{"text": " Paris", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": USAGE,
}

EMBEDDINGS: Body = {
    "object": "list",
    "model": "m",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
    "usage": {"prompt_tokens": 4, "total_tokens": 4},
}

MODEL_METADATA: Body = {
    "state": "loaded",
    "default": True,
    "aliases": [],
    "size_bytes": 12879104,
    "context_length": 4096,
    "unload_in": None,
}
MODEL: Body = {"id": "m", "object": "model", "created": 1700000000, "owned_by": "mlx-server"}
MODELS: Body = {"object": "list", "data": [{**MODEL, "metadata": MODEL_METADATA}]}
TIMINGS: Body = {
    "prompt_n": 38,
    "prompt_ms": 47.2,
    "prompt_per_token_ms": 1.24,
    "prompt_per_second": 804.5,
    "predicted_n": 32,
    "predicted_ms": 217.3,
    "predicted_per_token_ms": 7.0,
    "predicted_per_second": 142.6,
    "cache_n": 0,
    "prompt_tokens": 38,
    "ttft_ms": 47.2,
}

OPENAI_ERROR: Body = {
    "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
}

ANTHROPIC_USAGE = {
    "input_tokens": 9,
    "output_tokens": 3,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}

MESSAGE: Body = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [{"type": "text", "text": "Paris."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": ANTHROPIC_USAGE,
}

ANTHROPIC_ERROR: Body = {
    "type": "error",
    "error": {"type": "invalid_request_error", "message": "max_tokens: required"},
}


def event(kind: str, **fields: Any) -> Body:
    return {"type": kind, **fields}


def message_start() -> Body:
    start = {**MESSAGE, "content": [], "stop_reason": None}
    start["usage"] = {**ANTHROPIC_USAGE, "output_tokens": 0}
    return event("message_start", message=start)


def text_delta(text: str, index: int = 0) -> Body:
    return event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


END = [
    event(
        "message_delta",
        delta={"stop_reason": "end_turn", "stop_sequence": None},
        usage={**ANTHROPIC_USAGE},
    ),
    event("message_stop"),
]

ANTHROPIC_STREAM: list[Body] = [
    message_start(),
    event("ping"),
    event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    text_delta("Par"),
    text_delta("is."),
    event("content_block_stop", index=0),
    *END,
]

THINKING_TOOL_STREAM: list[Body] = [
    message_start(),
    event(
        "content_block_start",
        index=0,
        content_block={"type": "thinking", "thinking": "", "signature": ""},
    ),
    event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hm."}),
    event("content_block_stop", index=0),
    event(
        "content_block_start",
        index=1,
        content_block={"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
    ),
    event(
        "content_block_delta",
        index=1,
        delta={"type": "input_json_delta", "partial_json": '{"city": "Par'},
    ),
    event(
        "content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": 'is"}'}
    ),
    event("content_block_stop", index=1),
    event(
        "message_delta",
        delta={"stop_reason": "tool_use", "stop_sequence": None},
        usage={"output_tokens": 7},
    ),
    event("message_stop"),
]

GOOD: list[tuple[str, Body]] = [
    ("CreateChatCompletionResponse", CHAT),
    ("openai.ChatCompletion", CHAT_TOOLS),
    *[("CreateChatCompletionStreamResponse", c) for c in CHAT_STREAM + TOOL_STREAM],
    ("CreateCompletionResponse", COMPLETION),
    ("CreateCompletionResponse", {**COMPLETION, "timings": TIMINGS}),
    ("CreateChatCompletionResponse", {**CHAT, "timings": TIMINGS}),
    ("CreateChatCompletionStreamResponse", {**USAGE_CHUNK, "timings": TIMINGS}),
    ("CreateEmbeddingResponse", EMBEDDINGS),
    ("Model", MODEL),
    ("ListModelsResponse", MODELS),
    ("ErrorResponse", OPENAI_ERROR),
    ("Message", MESSAGE),
    ("ErrorEvent", ANTHROPIC_ERROR),
    ("CountMessageTokensResponse", {"input_tokens": 12}),
    *[("MessageStreamEvent", e) for e in ANTHROPIC_STREAM + THINKING_TOOL_STREAM],
    ("MessageStreamEvent", ANTHROPIC_ERROR),
]


@pytest.mark.parametrize(("name", "body"), GOOD, ids=lambda v: v if isinstance(v, str) else "")
def test_good_bodies_pass(name: str, body: Body) -> None:
    openapi.validate(name, body)


def test_every_contract_builds_and_every_alias_resolves() -> None:
    for name in openapi.schema_names():
        openapi.validator(name)
    assert {"CreateChatCompletionResponse", "MessageStreamEvent", "ErrorEvent"} <= set(
        openapi.schema_names()
    )
    with pytest.raises(KeyError, match="no response contract"):
        openapi.validate("NoSuchSchema", {})


# --------------------------------------------------------------------------- bad bodies


def edit(body: Body, change: Callable[[Body], object]) -> Body:
    out = copy.deepcopy(body)
    change(out)
    return out


def drop(path: str) -> Callable[[Body], None]:
    *parents, last = path.split(".")

    def change(body: Body) -> None:
        node: Any = body
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        del node[last]

    return change


def put(path: str, value: Any) -> Callable[[Body], None]:
    *parents, last = path.split(".")

    def change(body: Body) -> None:
        node: Any = body
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return change


BAD: list[tuple[str, str, Body, str]] = [
    # (id, schema, body, a word the error must contain)
    ("chat-no-id", "CreateChatCompletionResponse", edit(CHAT, drop("id")), "'id'"),
    (
        "chat-no-finish-reason",
        "CreateChatCompletionResponse",
        edit(CHAT, drop("choices.0.finish_reason")),
        "finish_reason",
    ),
    (
        "chat-unknown-finish-reason",
        "CreateChatCompletionResponse",
        edit(CHAT, put("choices.0.finish_reason", "eos")),
        "eos",
    ),
    (
        "chat-null-finish-reason",
        "CreateChatCompletionResponse",
        edit(CHAT, put("choices.0.finish_reason", None)),
        "None",
    ),
    (
        "chat-created-string",
        "CreateChatCompletionResponse",
        edit(CHAT, put("created", "1700000000")),
        "integer",
    ),
    (
        "chat-wrong-object",
        "CreateChatCompletionResponse",
        edit(CHAT, put("object", "chat.completion.chunk")),
        "chat.completion",
    ),
    (
        "chat-extra-top-level-key",
        "CreateChatCompletionResponse",
        edit(CHAT, put("debug", {"ms": 3})),
        "debug",
    ),
    (
        "chat-timings-incomplete",
        "CreateChatCompletionResponse",
        edit(CHAT, put("timings", {"prompt_n": 3})),
        "prompt_ms",
    ),
    (
        "model-metadata-unknown-state",
        "ListModelsResponse",
        edit(MODELS, put("data.0.metadata", {**MODEL_METADATA, "state": "warm"})),
        "warm",
    ),
    (
        "chat-extra-message-key",
        "CreateChatCompletionResponse",
        edit(CHAT, put("choices.0.message.thinking", "x")),
        "thinking",
    ),
    (
        "chat-message-no-refusal",
        "CreateChatCompletionResponse",
        edit(CHAT, drop("choices.0.message.refusal")),
        "refusal",
    ),
    (
        "chat-message-no-content",
        "CreateChatCompletionResponse",
        edit(CHAT, drop("choices.0.message.content")),
        "content",
    ),
    (
        "chat-no-logprobs-key",
        "CreateChatCompletionResponse",
        edit(CHAT, drop("choices.0.logprobs")),
        "logprobs",
    ),
    (
        "chat-usage-float",
        "CreateChatCompletionResponse",
        edit(CHAT, put("usage.total_tokens", 12.5)),
        "integer",
    ),
    (
        "chat-usage-missing-total",
        "CreateChatCompletionResponse",
        edit(CHAT, drop("usage.total_tokens")),
        "total_tokens",
    ),
    (
        "chat-tool-call-unknown-type",
        "CreateChatCompletionResponse",
        edit(CHAT_TOOLS, put("choices.0.message.tool_calls.0.type", "fn")),
        "fn",
    ),
    (
        "chat-tool-call-arguments-object",
        "CreateChatCompletionResponse",
        edit(CHAT_TOOLS, put("choices.0.message.tool_calls.0.function.arguments", {"a": 1})),
        "string",
    ),
    (
        "chat-logprob-no-bytes",
        "CreateChatCompletionResponse",
        edit(CHAT_TOOLS, drop("choices.0.logprobs.content.0.bytes")),
        "bytes",
    ),
    (
        "chat-role-user",
        "CreateChatCompletionResponse",
        edit(CHAT, put("choices.0.message.role", "user")),
        "assistant",
    ),
    (
        "chunk-no-finish-reason-key",
        "CreateChatCompletionStreamResponse",
        edit(CHAT_STREAM[1], drop("choices.0.finish_reason")),
        "finish_reason",
    ),
    (
        "chunk-unknown-finish-reason",
        "CreateChatCompletionStreamResponse",
        edit(CHAT_STREAM[3], put("choices.0.finish_reason", "done")),
        "done",
    ),
    (
        "chunk-content-number",
        "CreateChatCompletionStreamResponse",
        edit(CHAT_STREAM[1], put("choices.0.delta.content", 7)),
        "string",
    ),
    (
        "chunk-extra-delta-key",
        "CreateChatCompletionStreamResponse",
        edit(CHAT_STREAM[1], put("choices.0.delta.text", "x")),
        "text",
    ),
    (
        "chunk-tool-call-no-index",
        "CreateChatCompletionStreamResponse",
        edit(TOOL_STREAM[2], drop("choices.0.delta.tool_calls.0.index")),
        "index",
    ),
    (
        "completion-unknown-finish-reason",
        "CreateCompletionResponse",
        edit(COMPLETION, put("choices.0.finish_reason", "tool_calls")),
        "tool_calls",
    ),
    (
        "completion-no-text",
        "CreateCompletionResponse",
        edit(COMPLETION, drop("choices.0.text")),
        "text",
    ),
    (
        "completion-extra-key",
        "CreateCompletionResponse",
        edit(COMPLETION, put("prompt", "x")),
        "prompt",
    ),
    (
        "embedding-string-vector",
        "CreateEmbeddingResponse",
        edit(EMBEDDINGS, put("data.0.embedding", "AAAA")),
        "array",
    ),
    (
        "embedding-no-usage",
        "CreateEmbeddingResponse",
        edit(EMBEDDINGS, drop("usage")),
        "usage",
    ),
    ("model-no-owner", "Model", edit(MODEL, drop("owned_by")), "owned_by"),
    ("models-wrong-object", "ListModelsResponse", edit(MODELS, put("object", "models")), "list"),
    ("error-no-param", "ErrorResponse", edit(OPENAI_ERROR, drop("error.param")), "param"),
    ("error-bare-string", "ErrorResponse", {"error": "bad"}, "object"),
    ("error-extra-key", "ErrorResponse", edit(OPENAI_ERROR, put("detail", "x")), "detail"),
    (
        "message-unknown-stop-reason",
        "Message",
        edit(MESSAGE, put("stop_reason", "length")),
        "length",
    ),
    ("message-no-stop-reason", "Message", edit(MESSAGE, drop("stop_reason")), "stop_reason"),
    (
        "message-no-stop-sequence",
        "Message",
        edit(MESSAGE, drop("stop_sequence")),
        "stop_sequence",
    ),
    ("message-role-user", "Message", edit(MESSAGE, put("role", "user")), "assistant"),
    ("message-block-no-text", "Message", edit(MESSAGE, drop("content.0.text")), "text"),
    (
        "message-unknown-block",
        "Message",
        edit(MESSAGE, put("content.0.type", "markdown")),
        "markdown",
    ),
    (
        "message-tool-input-string",
        "Message",
        edit(
            MESSAGE,
            put("content.0", {"type": "tool_use", "id": "t", "name": "f", "input": "{}"}),
        ),
        "object",
    ),
    (
        "message-usage-no-output",
        "Message",
        edit(MESSAGE, drop("usage.output_tokens")),
        "output_tokens",
    ),
    ("message-extra-key", "Message", edit(MESSAGE, put("finish_reason", "stop")), "finish"),
    (
        "event-unknown-type",
        "MessageStreamEvent",
        {"type": "content_block_end", "index": 0},
        "content_block_end",
    ),
    ("event-stop-no-index", "MessageStreamEvent", {"type": "content_block_stop"}, "index"),
    (
        "event-unknown-delta",
        "MessageStreamEvent",
        edit(ANTHROPIC_STREAM[3], put("delta.type", "json_delta")),
        "json_delta",
    ),
    (
        "event-delta-unknown-stop-reason",
        "MessageStreamEvent",
        edit(END[0], put("delta.stop_reason", "stop")),
        "stop",
    ),
    (
        "event-ping-extra",
        "MessageStreamEvent",
        {"type": "ping", "at": 1},
        "at",
    ),
    (
        "anthropic-error-unknown-kind",
        "ErrorEvent",
        edit(ANTHROPIC_ERROR, put("error.type", "bad_request")),
        "bad_request",
    ),
    ("count-tokens-string", "CountMessageTokensResponse", {"input_tokens": "12"}, "integer"),
]


@pytest.mark.parametrize(
    ("name", "body", "word"), [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_bad_bodies_are_rejected(name: str, body: Body, word: str) -> None:
    with pytest.raises(openapi.SpecValidationError) as excinfo:
        openapi.validate(name, body)
    summary = str(excinfo.value).split("\ninstance:")[0]  # the reasons, not the body
    assert word in summary, str(excinfo.value)


def test_rules_that_no_longer_fit_fail_loudly() -> None:
    """A tightening rule naming a field the SDK dropped is an error, not a silent no-op."""
    broken = schemas.Contract(
        name="x", source=schemas.ModelList, always={"ModelList": ("no_such_field",)}
    )
    with pytest.raises(schemas.ContractError, match="no_such_field"):
        schemas.build(broken)
    broken = schemas.Contract(name="x", source=schemas.ModelList, always={"Nope": ("data",)})
    with pytest.raises(schemas.ContractError, match="Nope"):
        schemas.build(broken)


# --------------------------------------------------------------------------- stream order


def test_good_streams_add_up() -> None:
    [choice] = streams.check_chat_stream(CHAT_STREAM, include_usage=True).values()
    assert (choice.content, choice.finish_reason) == ("Paris.", "stop")
    [tool] = streams.check_chat_stream(TOOL_STREAM).values()
    assert tool.reasoning_content == "Call it."
    assert tool.tool_calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    two = [
        chunk({"role": "assistant", "content": ""}, index=0),
        chunk({"role": "assistant", "content": ""}, index=1),
        chunk({"content": "a"}, index=1),
        chunk({}, "stop", index=1),
        chunk({}, "length", index=0),
    ]
    assert {i: c.content for i, c in streams.check_chat_stream(two).items()} == {0: "", 1: "a"}

    message = streams.check_anthropic_stream(ANTHROPIC_STREAM)
    assert message["content"] == [{"type": "text", "text": "Paris."}]
    assert message["stop_reason"] == "end_turn"
    message = streams.check_anthropic_stream(THINKING_TOOL_STREAM)
    assert [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
    assert message["content"][1]["input"] == {"city": "Paris"}
    assert message["usage"]["output_tokens"] == 7
    failed = streams.check_anthropic_stream([*ANTHROPIC_STREAM[:4], ANTHROPIC_ERROR])
    assert failed["error"]["type"] == "invalid_request_error"


def swap(events: list[Body], i: int, j: int) -> list[Body]:
    out = list(events)
    out[i], out[j] = out[j], out[i]
    return out


BAD_ANTHROPIC: list[tuple[str, list[Body], str]] = [
    ("empty", [], "empty"),
    ("ping-first", swap(ANTHROPIC_STREAM, 0, 1), "open with message_start"),
    ("delta-before-start", swap(ANTHROPIC_STREAM, 2, 3), "not open"),
    ("stop-before-deltas", swap(ANTHROPIC_STREAM, 3, 5), "not open"),
    ("message-delta-inside-block", swap(ANTHROPIC_STREAM, 5, 6), "is open"),
    ("stop-before-message-delta", swap(ANTHROPIC_STREAM, 6, 7), "without a message_delta"),
    ("no-message-stop", ANTHROPIC_STREAM[:-1], "without message_stop"),
    ("event-after-stop", [*ANTHROPIC_STREAM, event("ping")], "nothing may follow"),
    ("two-message-starts", [message_start(), *ANTHROPIC_STREAM], "second message_start"),
    (
        "index-skips",
        [edit(e, put("index", 1)) if "index" in e else e for e in ANTHROPIC_STREAM],
        "expected block index 0",
    ),
    (
        "second-block-while-open",
        [*ANTHROPIC_STREAM[:4], *ANTHROPIC_STREAM[2:]],
        "still open",
    ),
    (
        "text-delta-in-tool-block",
        [
            *THINKING_TOOL_STREAM[:5],
            text_delta("x", index=1),
            *THINKING_TOOL_STREAM[5:],
        ],
        "text_delta for a tool_use",
    ),
    (
        "tool-input-not-json",
        [*THINKING_TOOL_STREAM[:6], *THINKING_TOOL_STREAM[7:]],
        "not JSON",
    ),
    (
        "block-after-message-delta",
        [*ANTHROPIC_STREAM[:6], END[0], *ANTHROPIC_STREAM[2:6], END[1]],
        "after message_delta",
    ),
    (
        "start-with-stop-reason",
        [edit(ANTHROPIC_STREAM[0], put("message.stop_reason", "end_turn")), *ANTHROPIC_STREAM[1:]],
        "no stop_reason",
    ),
    (
        "invalid-event-inside",
        [
            *ANTHROPIC_STREAM[:3],
            edit(ANTHROPIC_STREAM[3], drop("delta.text")),
            *ANTHROPIC_STREAM[4:],
        ],
        "event 3",
    ),
    ("error-not-last", [*ANTHROPIC_STREAM[:3], ANTHROPIC_ERROR, *ANTHROPIC_STREAM[3:]], "ends"),
]


@pytest.mark.parametrize(
    ("events", "word"), [pytest.param(*case[1:], id=case[0]) for case in BAD_ANTHROPIC]
)
def test_anthropic_streams_out_of_order_are_rejected(events: list[Body], word: str) -> None:
    with pytest.raises(StreamOrderError, match=word):
        streams.check_anthropic_stream(events)


BAD_CHAT: list[tuple[str, list[Body], bool, str]] = [
    ("empty", [], False, "empty"),
    ("no-role-first", CHAT_STREAM[1:], True, "open with role"),
    (
        "role-changes",
        [CHAT_STREAM[0], chunk({"role": "user"}, usage=None), *CHAT_STREAM[1:]],
        True,
        "role",
    ),
    (
        "id-changes",
        [CHAT_STREAM[0], {**CHAT_STREAM[1], "id": "chatcmpl-2"}, *CHAT_STREAM[2:]],
        True,
        "id changed",
    ),
    (
        "two-finish-reasons",
        [*CHAT_STREAM[:4], CHAT_STREAM[3], CHAT_STREAM[4]],
        True,
        "after its finish_reason",
    ),
    ("no-finish-reason", [*CHAT_STREAM[:3], CHAT_STREAM[4]], True, "never got a finish_reason"),
    ("content-after-finish", swap(CHAT_STREAM, 2, 3), True, "after its finish_reason"),
    ("usage-not-last", swap(CHAT_STREAM, 3, 4), True, "usage"),
    ("usage-missing", CHAT_STREAM[:-1], True, "usage chunk"),
    ("usage-unasked", CHAT_STREAM, False, "usage"),
    (
        "usage-key-missing",
        [*[edit(c, drop("usage")) for c in CHAT_STREAM[:4]], USAGE_CHUNK],
        True,
        "usage: null",
    ),
    ("tool-call-without-name", [TOOL_STREAM[0], *TOOL_STREAM[3:]], False, "opens without"),
    ("tool-call-renamed", [*TOOL_STREAM[:3], TOOL_STREAM[2], *TOOL_STREAM[3:]], False, "renamed"),
    (
        "tool-call-skips",
        [
            *TOOL_STREAM[:2],
            edit(TOOL_STREAM[2], put("choices.0.delta.tool_calls.0.index", 1)),
            TOOL_STREAM[-1],
        ],
        False,
        "skips ahead",
    ),
    (
        "choice-index-gap",
        [chunk({"role": "assistant"}, index=1), chunk({}, "stop", index=1)],
        False,
        "0..n-1",
    ),
    (
        "invalid-chunk-inside",
        [CHAT_STREAM[0], edit(CHAT_STREAM[1], put("object", "x")), *CHAT_STREAM[2:]],
        True,
        "chunk 1",
    ),
]


@pytest.mark.parametrize(
    ("chunks", "include_usage", "word"), [pytest.param(*case[1:], id=case[0]) for case in BAD_CHAT]
)
def test_chat_streams_out_of_order_are_rejected(
    chunks: list[Body], include_usage: bool, word: str
) -> None:
    with pytest.raises(StreamOrderError, match=word):
        streams.check_chat_stream(chunks, include_usage=include_usage)
