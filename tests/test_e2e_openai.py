"""End to end: the real server (default model, CPU) driven by the openai SDK and raw httpx.

Every body is checked against the response models of the official `openai` package, used
strictly (`mlx_server.testing.openapi`), and streams for their order (`testing.streams`).
Generations are short and share one prompt, so after the first request the server's prompt
cache makes them cheap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from mlx_server.testing import openapi, streams
from mlx_server.testing.server import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
MODEL = "SmolLM2-135M-Instruct"

# SmolLM2's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>): banning them means the
# generation cannot end before max_tokens.
NO_EOS_BIAS = {"0": -100, "1": -100, "2": -100}
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def server(default_server: ServerProcess) -> ServerProcess:
    return default_server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120.0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def greedy(client: openai.OpenAI) -> dict[str, Any]:
    """The raw JSON of the non-streaming greedy answer, shared by the tests that compare."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, **GREEDY)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    body = json.loads(raw.text)
    parsed = raw.parse()  # the SDK's own model must accept it too
    assert parsed.choices[0].message.content == body["choices"][0]["message"]["content"]
    return body


def greedy_text(greedy: dict[str, Any]) -> str:
    return greedy["choices"][0]["message"]["content"]


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """Yield (kind, value) for an SSE stream: ("data", payload) per event, ("comment", text)
    per comment line. Multi-line data fields are joined with newlines, as the spec says."""
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield "data", "\n".join(data)
                data = []
        elif line.startswith(":"):
            yield "comment", line[1:].strip()
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            assert field in ("data", "event", "id", "retry"), f"unexpected SSE line {line!r}"
            if field == "data":
                data.append(value)
    if data:
        yield "data", "\n".join(data)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    openapi.validate("ErrorResponse", body)
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def health(http: httpx.Client) -> dict[str, Any]:
    r = http.get("/health")
    assert r.status_code == 200, r.text
    return r.json()


# --------------------------------------------------------------------------- 1. non-streaming


def test_chat_completion_sdk(greedy: dict[str, Any]) -> None:
    openapi.validate("CreateChatCompletionResponse", greedy)
    assert greedy["object"] == "chat.completion"
    assert greedy["id"].startswith("chatcmpl-")
    [choice] = greedy["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = greedy["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= GREEDY["max_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == GREEDY["max_tokens"]


# --------------------------------------------------------------------------- 2. SDK streaming


def test_chat_stream_sdk(client: openai.OpenAI, greedy: dict[str, Any]) -> None:
    with client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    ) as stream:
        chunks = list(stream)
    [choice] = streams.check_chat_stream([c.to_dict() for c in chunks], include_usage=True).values()
    assert choice.finish_reason == greedy["choices"][0]["finish_reason"]
    assert len(chunks) >= 3
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"

    *content_chunks, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert all(c.usage is None for c in content_chunks)
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finishes == [greedy["choices"][0]["finish_reason"]]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == greedy_text(greedy)

    assert last.usage.completion_tokens == greedy["usage"]["completion_tokens"]
    assert last.usage.prompt_tokens == greedy["usage"]["prompt_tokens"]
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


# --------------------------------------------------------------------------- 3. raw SSE


def test_chat_stream_raw_sse(http: httpx.Client, greedy: dict[str, Any]) -> None:
    body = {"model": "default", "messages": MESSAGES, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))

    payloads = [value for kind, value in events if kind == "data"]
    comments = [value for kind, value in events if kind == "comment"]
    assert all(c == "keepalive" for c in comments), comments
    assert payloads and payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    [choice] = streams.check_chat_stream(chunks).values()
    assert choice.content == greedy_text(greedy)
    # Without stream_options.include_usage there is no usage chunk: every chunk has a choice.
    assert all(len(c["choices"]) == 1 and c.get("usage") is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == greedy["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == greedy_text(greedy)


# --------------------------------------------------------------------------- 4. length and stop


def test_max_tokens_length(client: openai.OpenAI, greedy: dict[str, Any]) -> None:
    assert greedy["usage"]["completion_tokens"] > 3, "the greedy answer is too short to cut"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=3
    )
    body = json.loads(raw.text)
    openapi.validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert greedy_text(greedy).startswith(choice["message"]["content"])


def test_stop_string(client: openai.OpenAI, greedy: dict[str, Any]) -> None:
    full = greedy_text(greedy)
    words = full.split(" ")
    assert len(words) >= 3, f"the greedy answer {full!r} is too short to cut"
    stop = " " + words[2]  # e.g. " of" in "The capital of France is Paris."
    expected = full[: full.index(stop)]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stop=stop, **GREEDY
    )
    body = json.loads(raw.text)
    openapi.validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == expected
    assert stop not in choice["message"]["content"]
    usage = body["usage"]
    assert usage["completion_tokens"] < greedy["usage"]["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# --------------------------------------------------------------------------- 5. errors

USER_HI = [{"role": "user", "content": "hi"}]
ERROR_CASES = [
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {"content": b'{"model": MODEL, "messages": ['},
        400,
        None,
        id="invalid-json",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {"json": {"model": MODEL}},
        400,
        "messages",
        id="missing-messages",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}},
        400,
        "messages[0].role",
        id="bad-role",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": USER_HI, "temperature": 5}},
        400,
        "temperature",
        id="temperature-5",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {"json": {"model": MODEL, "messages": USER_HI, "max_tokens": 0}},
        400,
        "max_tokens",
        id="max-tokens-0",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        {
            "json": {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                        ],
                    }
                ],
            }
        },
        400,
        "messages[0].content[1]",
        id="image-part",
    ),
    pytest.param("GET", "/v1/no-such-route", {}, 404, None, id="unknown-route"),
    pytest.param("GET", "/v1/chat/completions", {}, 405, None, id="get-chat-completions"),
    pytest.param("GET", "/v1/models/no-such-model", {}, 404, None, id="unknown-model"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "param"), ERROR_CASES)
def test_errors(
    http: httpx.Client,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    headers = {"content-type": "application/json"} if "content" in kwargs else None
    r = http.request(method, path, headers=headers, **kwargs)
    error = assert_openai_error(r, status)
    if param is not None:
        assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if status == 405:
        assert "POST" in r.headers.get("allow", ""), r.headers


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    assert excinfo.value.status_code == 400
    assert excinfo.value.param == "temperature"
    assert excinfo.value.type == "invalid_request_error"
    openapi.validate("ErrorResponse", excinfo.value.response.json())


# --------------------------------------------------------------------------- 6. models, health


def test_models(http: httpx.Client, client: openai.OpenAI) -> None:
    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    openapi.validate("ListModelsResponse", body)
    assert len(body["data"]) >= 1
    model_id = body["data"][0]["id"]

    sdk_ids = [m.id for m in client.models.list()]
    assert sdk_ids == [m["id"] for m in body["data"]]
    assert client.models.retrieve(model_id).id == model_id

    r = http.get(f"/v1/models/{model_id}")
    assert r.status_code == 200
    openapi.validate("Model", r.json())


def test_health(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == "ok"
    assert body["running"] >= 0 and body["waiting"] >= 0


# --------------------------------------------------------------------------- 7. disconnect


def test_client_disconnect_cancels_generation(http: httpx.Client) -> None:
    # Long enough that the answer cannot finish while the client reads its first chunks, even
    # where the default model decodes fast (OpenBLAS float32 on a quiet machine).
    max_tokens = 2000
    body = {
        "model": "default",
        "messages": MESSAGES,
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "logit_bias": NO_EOS_BIAS,
    }
    contents: list[str] = []
    # A client of its own: closing the response must really drop the connection, not park it.
    with (
        httpx.Client(base_url=http.base_url, timeout=TIMEOUT) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for kind, value in sse_events(r):
            if kind != "data":
                continue
            assert value != "[DONE]", "the stream ended before the client left"
            chunk = json.loads(value)
            assert chunk["choices"][0]["finish_reason"] is None, chunk
            if chunk["choices"][0]["delta"].get("content"):
                contents.append(chunk["choices"][0]["delta"]["content"])
            if len(contents) == 2:
                break
        assert health(http)["running"] >= 1
    left = time.monotonic()

    deadline = left + 10.0
    while (state := health(http))["running"] != 0:
        assert time.monotonic() < deadline, (
            f"generation still running 10 s after disconnect: {state}"
        )
        time.sleep(0.1)
    elapsed = time.monotonic() - left
    assert state["waiting"] == 0
    # 2000 tokens take minutes at this host's speeds; a cancelled request stops within a few.
    assert elapsed < 10.0

    # The scheduler is still healthy: a short cached request completes.
    r = http.post(
        "/v1/chat/completions",
        json={"model": "default", "messages": MESSAGES, "temperature": 0, "max_tokens": 1},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1
