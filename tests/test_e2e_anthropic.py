"""End to end: the Anthropic Messages API of the real server (default model, CPU), driven by the
official `anthropic` SDK and by raw httpx.

Bodies and stream events are checked against the response models of the official `anthropic`
package, used strictly (`mlx_server.testing.openapi`), and every stream's order with
`mlx_server.testing.streams`. Generations are short and share one prompt with
the OpenAI tests, so the server's prompt cache makes most of them cheap.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pydantic
import pytest
from anthropic.types import MessageParam

from mlx_server.generation.prepare import closing_length
from mlx_server.testing import openapi, streams
from mlx_server.testing.agent_session import check_prefix_reuse, hit_rates, run_agent_session
from mlx_server.testing.server import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MESSAGES: list[MessageParam] = [{"role": "user", "content": QUESTION}]
MAX_TOKENS = 12
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}  # the 2.x SDK has no temperature
MODEL = "SmolLM2-135M-Instruct"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
HEADERS = {"x-api-key": "x", "anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(
    ("full", "empty", "closing"),
    [
        pytest.param((1, 2, 7, 8, 3, 4), (1, 2, 3, 4), 2, id="chatml"),
        pytest.param((1, 2, 7, 4, 3, 4), (1, 2, 3, 4), 2, id="content-ends-like-closing"),
        pytest.param((1, 9, 7, 3, 4), (1, 2, 3, 4), 2, id="boundary-merges"),
        pytest.param((1, 2, 5, 7, 3), (1, 2, 3), 1, id="template-skips-empty-turns"),
        pytest.param((1, 2, 7), (1, 2), 0, id="no-closing"),
    ],
)
def test_prefill_closing_length(
    full: tuple[int, ...], empty: tuple[int, ...], closing: int
) -> None:
    """The tokens a template writes after the final turn's content: never part of the content."""
    assert closing_length(full, empty) == closing


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def server(default_server: ServerProcess) -> ServerProcess:
    return default_server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=server.base_url, api_key="x", max_retries=0, timeout=120.0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT, headers=HEADERS) as c:
        yield c


@pytest.fixture(scope="module")
def created(client: anthropic.Anthropic) -> dict[str, Any]:
    """The raw JSON of the non-streaming greedy answer, shared by the tests that compare."""
    raw = client.messages.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY
    )
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.headers.get("request-id", "").startswith("req_")
    body = raw.json()
    parsed = raw.parse()  # the SDK's own model must accept it too
    assert parsed.content[0].type == "text"
    assert parsed.content[0].text == body["content"][0]["text"]
    return body


def answer(message: dict[str, Any]) -> str:
    [block] = message["content"]
    assert block["type"] == "text"
    return block["text"]


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data object) per SSE event; every event must carry exactly one `event:` line
    and a `data:` JSON object whose `type` is the event name."""
    events: list[tuple[str, dict[str, Any]]] = []
    name: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if name is None and not data:
                continue
            assert name is not None, f"an event without an 'event:' line: {data}"
            assert data, f"event {name!r} without a 'data:' line"
            payload = json.loads("\n".join(data))
            assert isinstance(payload, dict) and payload.get("type") == name, (name, payload)
            events.append((name, payload))
            name, data = None, []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            assert name is None, f"two 'event:' lines in one event: {name!r}, {value!r}"
            name = value
        elif field == "data":
            data.append(value)
        else:
            pytest.fail(f"unexpected SSE line {line!r}")
    assert name is None and not data, "the stream ended inside an event"
    return events


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    openapi.validate("ErrorEvent", body)  # the HTTP error body: the stream's error event
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def prompt_total(usage: Any) -> int:
    """The whole prompt: Anthropic's `input_tokens` is the part the prompt cache did not serve
    (`cache_read_input_tokens`)."""
    if isinstance(usage, dict):
        return usage["input_tokens"] + usage["cache_read_input_tokens"]
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def count(http: httpx.Client, **body: Any) -> int:
    r = http.post("/v1/messages/count_tokens", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    openapi.validate("CountMessageTokensResponse", r.json())
    assert set(r.json()) == {"input_tokens"}
    return r.json()["input_tokens"]


# --------------------------------------------------------------------------- 1. non-streaming


def test_create_sdk(created: dict[str, Any]) -> None:
    openapi.validate("Message", created)
    assert created["id"].startswith("msg_")
    assert created["type"] == "message"
    assert created["role"] == "assistant"
    assert created["model"] == MODEL
    assert "Paris" in answer(created)
    assert created["stop_reason"] == "end_turn"
    assert created["stop_sequence"] is None
    usage = created["usage"]
    assert usage["input_tokens"] > 0  # at least the last prompt token is always computed
    assert 0 < usage["output_tokens"] <= MAX_TOKENS
    assert usage["cache_creation_input_tokens"] == 0
    assert 0 <= usage["cache_read_input_tokens"] < prompt_total(usage)


def test_count_tokens_sdk(client: anthropic.Anthropic, created: dict[str, Any]) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert counted.input_tokens == prompt_total(created["usage"])


def test_system_blocks_count_like_a_string(http: httpx.Client) -> None:
    system = "Answer in one word."
    as_string = count(http, system=system, messages=MESSAGES)
    assert count(http, system=[{"type": "text", "text": system}], messages=MESSAGES) == as_string
    # SmolLM2's template adds its own system prompt when there is none; ours replaces it.
    assert as_string != count(http, messages=MESSAGES)


def test_max_tokens(client: anthropic.Anthropic, created: dict[str, Any]) -> None:
    assert created["usage"]["output_tokens"] > 3, "the greedy answer is too short to cut"
    raw = client.messages.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, **GREEDY
    )
    body = raw.json()
    openapi.validate("Message", body)
    assert body["stop_reason"] == "max_tokens"
    assert body["stop_sequence"] is None
    assert body["usage"]["output_tokens"] == 3
    assert answer(created).startswith(answer(body))


def test_stop_sequences(client: anthropic.Anthropic, created: dict[str, Any]) -> None:
    full = answer(created)
    assert "Paris" in full
    raw = client.messages.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stop_sequences=["no such text", "Paris"],
        **GREEDY,
    )
    body = raw.json()
    openapi.validate("Message", body)
    assert body["stop_reason"] == "stop_sequence"
    assert body["stop_sequence"] == "Paris"
    assert answer(body) == full[: full.index("Paris")]
    assert body["usage"]["output_tokens"] < created["usage"]["output_tokens"]


def test_prefill_continues_the_assistant_turn(
    client: anthropic.Anthropic, created: dict[str, Any]
) -> None:
    prefill = "The capital of France is"
    assert answer(created).startswith(prefill), "the greedy answer changed; pick a new prefill"
    messages: list[MessageParam] = [*MESSAGES, {"role": "assistant", "content": prefill}]
    message = client.messages.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, **GREEDY
    )
    text = message.content[0].text  # type: ignore[union-attr]
    # Only the continuation comes back, and it is the rest of the un-prefilled answer.
    assert answer(created) == prefill + text
    assert message.stop_reason == "end_turn"
    # The prefill replaces the generation prompt; it is counted like everything else.
    counted = client.messages.count_tokens(model=MODEL, messages=messages)
    assert counted.input_tokens == prompt_total(message.usage)
    assert prompt_total(created["usage"]) < counted.input_tokens


def test_system_prompt(client: anthropic.Anthropic) -> None:
    system = "Answer in one word."
    message = client.messages.create(
        model=MODEL, system=system, messages=MESSAGES, max_tokens=1, **GREEDY
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens == 1
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=MESSAGES)
    assert counted.input_tokens == prompt_total(message.usage)


def test_multi_turn_counts(http: httpx.Client, created: dict[str, Any]) -> None:
    """Turns add up; consecutive turns of one role merge (as Anthropic does), so splitting a
    turn into two messages costs only the separator."""
    history = [*MESSAGES, {"role": "assistant", "content": answer(created)}]
    follow_up = {"role": "user", "content": [{"type": "text", "text": "And of Germany?"}]}
    two_turns = count(http, messages=[*history, follow_up])
    assert two_turns > prompt_total(created["usage"]) + created["usage"]["output_tokens"]
    split = [{"role": "user", "content": "And of"}, {"role": "user", "content": "Germany?"}]
    assert count(http, messages=[*history, *split]) == count(
        http, messages=[*history, {"role": "user", "content": "And of\n\nGermany?"}]
    )


# --------------------------------------------------------------------------- 2. streaming


def test_stream_sdk(client: anthropic.Anthropic, created: dict[str, Any]) -> None:
    with client.messages.stream(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == answer(created)
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == created["stop_reason"]
    assert final.stop_sequence is None
    assert prompt_total(final.usage) == prompt_total(created["usage"])
    assert final.usage.output_tokens == created["usage"]["output_tokens"]
    assert final.id.startswith("msg_") and final.id != created["id"]


def test_stream_sdk_stop_sequence(client: anthropic.Anthropic, created: dict[str, Any]) -> None:
    with client.messages.stream(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, stop_sequences=["Paris"], **GREEDY
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence"
    assert final.stop_sequence == "Paris"
    full = answer(created)
    assert final.content[0].text == full[: full.index("Paris")]  # type: ignore[union-attr]


def test_stream_raw_sse(http: httpx.Client, created: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "metadata": {"user_id": "user-123"},
    }
    with http.stream("POST", "/v1/messages", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers.get("request-id", "").startswith("req_")
        events = sse_events(r)
    message = streams.check_anthropic_stream([payload for _, payload in events])
    assert message["content"] == created["content"]
    assert message["stop_reason"] == created["stop_reason"]
    assert message["usage"]["output_tokens"] == created["usage"]["output_tokens"]

    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"], names
    first_delta = names.index("content_block_delta")
    assert "ping" not in names[first_delta:], "pings only while the prompt is processed"
    core = " ".join(name for name in names if name != "ping")
    assert re.fullmatch(
        r"message_start content_block_start( content_block_delta)+ content_block_stop"
        r" message_delta message_stop",
        core,
    ), names

    payloads = [payload for _, payload in events]
    start = payloads[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["stop_sequence"] is None
    # message_start cannot know the cached part yet: the whole prompt; message_delta splits it.
    assert start["usage"]["input_tokens"] == prompt_total(created["usage"])
    assert start["usage"]["output_tokens"] in (0, 1)
    block_start = payloads[names.index("content_block_start")]
    assert block_start["index"] == 0
    assert block_start["content_block"] == {"type": "text", "text": ""}
    deltas = [p for p in payloads if p["type"] == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert "".join(d["delta"]["text"] for d in deltas) == answer(created)
    assert payloads[names.index("content_block_stop")]["index"] == 0
    message_delta = payloads[names.index("message_delta")]
    assert message_delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert message_delta["usage"]["output_tokens"] == created["usage"]["output_tokens"]
    assert prompt_total(message_delta["usage"]) == prompt_total(created["usage"])
    assert message_delta["usage"]["cache_read_input_tokens"] > 0  # the same prompt, again


def test_client_disconnect_cancels_generation(http: httpx.Client) -> None:
    # A counting prefill keeps the model going long after the client has left; the question
    # before it is the cached one, so only the prefill is new to the server.
    messages = [*MESSAGES, {"role": "assistant", "content": "1, 2, 3, 4, 5, 6, 7,"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 200, "stream": True}
    deltas = 0
    with (
        httpx.Client(base_url=http.base_url, timeout=TIMEOUT) as own,
        own.stream("POST", "/v1/messages", json={**body, "temperature": 0}) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            assert line != "event: message_stop", "the stream ended before the client left"
            deltas += line == "event: content_block_delta"
            if deltas == 2:
                break
        assert http.get("/health").json()["running"] >= 1
    left = time.monotonic()
    while (health := http.get("/health").json())["running"] != 0:
        assert time.monotonic() - left < 10.0, f"still generating after disconnect: {health}"
        time.sleep(0.1)
    assert health["waiting"] == 0


# --------------------------------------------------------------------------- 3. content blocks


def test_content_blocks_flatten(http: httpx.Client) -> None:
    """Tool use and tool results render through the template (as tool calls and tool turns)
    and are counted, earlier thinking is dropped; images are refused."""
    tools = [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should call the tool.", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny, 21 C"}],
                },
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "x", "is_error": True},
            ],
        },
    ]
    with_tools = count(http, messages=messages, tools=tools)
    without_tools = count(http, messages=messages)
    assert with_tools >= without_tools  # the default template ignores tools; others show them
    without_thinking = [messages[0], {**messages[1], "content": messages[1]["content"][1:]}]
    assert count(http, messages=without_thinking) == count(http, messages=messages[:2])
    assert without_tools > count(http, messages=messages[:1])

    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        content = [{"type": "text", "text": "What is this?"}, image]
        r = http.post(
            path,
            json={
                "model": MODEL,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": content}],
            },
        )
        assert "does not accept images" in assert_anthropic_error(r, 400, "invalid_request_error")


# --------------------------------------------------------------------------- 4. errors

USER_HI = [{"role": "user", "content": "hi"}]
OK = {"model": MODEL, "max_tokens": 5, "messages": USER_HI}
ERROR_CASES = [
    pytest.param({"model": MODEL, "messages": USER_HI}, 400, id="missing-max-tokens"),
    pytest.param({**OK, "max_tokens": 0}, 400, id="max-tokens-0"),
    pytest.param({**OK, "max_tokens": "5"}, 400, id="max-tokens-string"),
    pytest.param(b'{"model": "x", "messages": [', 400, id="invalid-json"),
    pytest.param(b"[1, 2]", 400, id="array-body"),
    pytest.param({"max_tokens": 5, "messages": USER_HI}, 400, id="missing-model"),
    pytest.param({**OK, "messages": []}, 400, id="empty-messages"),
    pytest.param({**OK, "messages": [{"role": "robot", "content": "hi"}]}, 400, id="bad-role"),
    pytest.param(
        {**OK, "messages": [{"role": "system", "content": "hi"}]}, 400, id="only-system-role"
    ),
    pytest.param({**OK, "messages": [{"role": "user", "content": ""}]}, 400, id="empty-content"),
    pytest.param({**OK, "messages": [{"role": "user", "content": 5}]}, 400, id="content-number"),
    pytest.param(
        {**OK, "messages": [{"role": "user", "content": [{"type": "video"}]}]},
        400,
        id="unknown-block",
    ),
    pytest.param({**OK, "system": [{"type": "image"}]}, 400, id="system-image"),
    pytest.param({**OK, "temperature": 5}, 400, id="temperature-5"),
    pytest.param({**OK, "temperature": 1.5}, 400, id="temperature-1.5"),
    pytest.param({**OK, "top_p": 2}, 400, id="top-p-2"),
    pytest.param({**OK, "top_k": -1}, 400, id="top-k-negative"),
    pytest.param({**OK, "stop_sequences": "Paris"}, 400, id="stop-sequences-string"),
    pytest.param({**OK, "stream": "yes"}, 400, id="stream-string"),
    pytest.param({**OK, "metadata": "x"}, 400, id="metadata-string"),
    pytest.param({**OK, "tools": [{"description": "no name"}]}, 400, id="tool-without-name"),
    pytest.param({**OK, "model": "no-such-model"}, 404, id="unknown-model"),
]


@pytest.mark.parametrize(("body", "status"), ERROR_CASES)
def test_errors(http: httpx.Client, body: dict[str, Any] | bytes, status: int) -> None:
    if isinstance(body, bytes):
        r = http.post("/v1/messages", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/messages", json=body)
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    assert_anthropic_error(r, status, kind)
    assert r.headers.get("request-id", "").startswith("req_")


COUNT_ERROR_CASES = [
    pytest.param(b"{", 400, id="invalid-json"),
    pytest.param({"model": MODEL}, 400, id="missing-messages"),
    pytest.param({"model": "no-such-model", "messages": USER_HI}, 404, id="unknown-model"),
]


@pytest.mark.parametrize(("body", "status"), COUNT_ERROR_CASES)
def test_count_tokens_errors(http: httpx.Client, body: dict[str, Any] | bytes, status: int) -> None:
    path = "/v1/messages/count_tokens"
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert_anthropic_error(
        r, status, "not_found_error" if status == 404 else "invalid_request_error"
    )


def test_wrong_method(http: httpx.Client) -> None:
    r = http.get("/v1/messages")
    assert_anthropic_error(r, 405, "invalid_request_error")
    assert "POST" in r.headers.get("allow", "")


def test_sdk_raises(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert bad.value.status_code == 400
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.request_id is not None and bad.value.request_id.startswith("req_")
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-no-such-model", messages=MESSAGES, max_tokens=5)
    assert missing.value.status_code == 404
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model=MODEL, messages=[])


# --------------------------------------------------------------------------- 5. clients of today


def test_messages_parse_with_the_default_model(client: anthropic.Anthropic) -> None:
    """`messages.parse` with a pydantic output type: the schema is enforced while generating
    (`output_config.format`), so the SDK's parse of the answer cannot fail."""

    class Capital(pydantic.BaseModel):
        country: str
        capital: str

    message = client.messages.parse(
        model=MODEL,
        max_tokens=24,
        messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        output_format=Capital,
        **GREEDY,
    )
    openapi.validate("Message", message.model_dump(mode="json", exclude={"parsed_output"}))
    assert message.stop_reason == "end_turn", message.content
    assert isinstance(message.parsed_output, Capital)
    assert message.parsed_output.capital == "Paris"


def test_claude_code_request_shape(client: anthropic.Anthropic) -> None:
    """What Claude Code 2.1 sends with its default models: adaptive thinking with an effort,
    a billing header first in `system`, a mid-conversation `system` entry, context_management.
    The billing header never reaches the prompt; the answer is the same as without it."""
    messages: list[Any] = [
        {"role": "user", "content": QUESTION},
        {"role": "system", "content": "Answer briefly."},
    ]
    extra = {
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "xhigh"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "temperature": 0,
    }
    with_header: list[Any] = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197; cch=1f2e;"},
        {"type": "text", "text": "You are a helpful assistant."},
    ]
    message = client.messages.create(
        model=MODEL, max_tokens=4, system=with_header, messages=messages, extra_body=extra
    )
    openapi.validate("Message", message.model_dump(mode="json"))
    counted = client.messages.count_tokens(
        model=MODEL, system=with_header, messages=messages, extra_body=extra
    )
    plain = client.messages.count_tokens(
        model=MODEL, system=with_header[1:], messages=messages, extra_body=extra
    )
    assert counted.input_tokens == plain.input_tokens == prompt_total(message.usage)


def test_agent_session_prefix_cache_with_the_default_model(http: httpx.Client) -> None:
    """A Claude Code-style session (`testing.agent_session`) on SmolLM2 with its own template,
    three turns to keep it short (five measured 85-89% on turns 2-5): each later turn reads the
    previous turn's prompt from the prefix cache (`-k agent_session -s` prints the table)."""
    usage = run_agent_session(http, 3, MODEL)
    check_prefix_reuse(usage)
    assert min(hit_rates(usage)[1:]) > 0.8, usage
