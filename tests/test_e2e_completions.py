"""End to end: `POST /v1/completions` on the real server (default model, CPU), driven by the
openai SDK and raw httpx, every body checked against the `openai`
package's response models, used strictly (`mlx_server.testing.openapi`).

Prompts are short and shared, and greedy generations at most 4 tokens, so the server's prompt
cache keeps the module fast. Two places where the spec cannot describe what OpenAI itself sends
are relaxed explicitly (`_spec_view`): a stream chunk's `finish_reason` is null until the choice
ends, and `echo` with `logprobs` lists prompt tokens with null log-probabilities.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from mlx_server.testing import openapi
from mlx_server.testing.server import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # PROMPT in SmolLM2's tokenizer (checked by echo)
OTHER = "Once upon a time"
OTHER_IDS = [6403, 1980, 253, 655]
MAX_TOKENS = 4
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": MAX_TOKENS}
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


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


def _spec_view(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as the spec can describe it: a null finish_reason (a stream chunk of a choice that
    goes on) becomes "stop"; null prompt-token logprobs (echo) become 0.0 and {}."""
    view = copy.deepcopy(body)
    for choice in view.get("choices", []):
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "stop"
        lps = choice.get("logprobs")
        if lps:
            lps["token_logprobs"] = [0.0 if v is None else v for v in lps["token_logprobs"]]
            lps["top_logprobs"] = [{} if v is None else v for v in lps["top_logprobs"]]
    return view


def validate(body: dict[str, Any]) -> None:
    openapi.validate("CreateCompletionResponse", _spec_view(body))
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")


def post(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = http.post("/v1/completions", json={"model": MODEL, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body)
    return body


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order (comments skipped)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    out: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(line[len("data: ") :])
        else:
            assert line == "" or line.startswith(":"), line
    return out


@pytest.fixture(scope="module")
def greedy(client: openai.OpenAI) -> dict[str, Any]:
    """The raw JSON of the non-streaming greedy completion of PROMPT, via the SDK."""
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, **GREEDY)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    body = json.loads(raw.text)
    validate(body)
    parsed = raw.parse()  # the SDK's own model accepts it too
    assert parsed.choices[0].text == body["choices"][0]["text"]
    return body


def greedy_text(greedy: dict[str, Any]) -> str:
    return greedy["choices"][0]["text"]


# --------------------------------------------------------------------------- the SDK


def test_sdk_non_streaming(greedy: dict[str, Any]) -> None:
    (choice,) = greedy["choices"]
    assert choice["index"] == 0
    assert choice["text"].strip()
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = greedy["usage"]
    assert usage["prompt_tokens"] == len(PROMPT_IDS)
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == MAX_TOKENS


def test_sdk_streaming(client: openai.OpenAI, greedy: dict[str, Any]) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    texts: list[str] = []
    finish: list[str] = []
    usage = None
    for chunk in stream:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            assert choice.index == 0
            texts.append(choice.text)
            if choice.finish_reason is not None:
                finish.append(choice.finish_reason)
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
    assert "".join(texts) == greedy_text(greedy)
    assert finish == [greedy["choices"][0]["finish_reason"]]
    assert usage is not None
    assert usage.prompt_tokens == greedy["usage"]["prompt_tokens"]
    assert usage.completion_tokens == greedy["usage"]["completion_tokens"]
    assert usage.total_tokens == greedy["usage"]["total_tokens"]


def test_raw_stream_framing(http: httpx.Client, greedy: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
        **GREEDY,
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        payloads = sse_data(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        validate(chunk)
    assert len({c["id"] for c in chunks}) == 1
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert all("usage" not in c for c in content)
    reasons = [c["choices"][0]["finish_reason"] for c in content]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert "".join(c["choices"][0]["text"] for c in content) == greedy_text(greedy)


# --------------------------------------------------------------------------- prompt shapes, n


def test_list_of_prompts_with_n(http: httpx.Client, greedy: dict[str, Any]) -> None:
    """Two prompts x n=2: choice index = prompt index x n + j; greedy choices of one prompt
    agree, and batching does not change the greedy text."""
    body = post(http, prompt=[PROMPT, OTHER], n=2, **GREEDY)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"] == greedy_text(greedy)
    assert choices[2]["text"] == choices[3]["text"]
    assert body["usage"]["prompt_tokens"] == len(PROMPT_IDS) + len(OTHER_IDS)
    completion = body["usage"]["completion_tokens"]
    assert 4 <= completion <= 4 * MAX_TOKENS


def test_token_id_prompts(
    http: httpx.Client, client: openai.OpenAI, greedy: dict[str, Any]
) -> None:
    """A list of lists of ids (two prompts, echoed: the ids decode to their text) and a flat
    list of ids (one prompt; `max_tokens: 0` generates nothing)."""
    both = client.completions.create(
        model=MODEL, prompt=[PROMPT_IDS, OTHER_IDS], echo=True, **GREEDY
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == PROMPT + greedy_text(greedy)
    assert both.choices[1].text.startswith(OTHER)
    assert both.usage is not None
    assert both.usage.prompt_tokens == len(PROMPT_IDS) + len(OTHER_IDS)
    flat = post(http, prompt=PROMPT_IDS, echo=True, max_tokens=0)
    assert flat["choices"][0]["text"] == PROMPT
    assert flat["usage"] == {
        "prompt_tokens": len(PROMPT_IDS),
        "completion_tokens": 0,
        "total_tokens": len(PROMPT_IDS),
        "prompt_tokens_details": {"cached_tokens": 0},
    }


# --------------------------------------------------------------------------- echo, logprobs, stop


def test_echo_sdk_logprobs_zero(client: openai.OpenAI, greedy: dict[str, Any]) -> None:
    """`echo` prepends the prompt; `logprobs: 0` lists only each sampled token."""
    out = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=0, **GREEDY)
    assert out.choices[0].text == PROMPT + greedy_text(greedy)
    assert out.usage is not None
    assert out.usage.completion_tokens == greedy["usage"]["completion_tokens"]
    lps = out.choices[0].logprobs
    assert lps is not None and lps.tokens is not None and lps.top_logprobs is not None
    generated = lps.top_logprobs[len(PROMPT_IDS) :]
    assert generated and all(len(top) == 1 for top in generated)


def test_echo_max_tokens_zero(http: httpx.Client) -> None:
    body = post(http, prompt=PROMPT, echo=True, max_tokens=0)
    assert body["choices"][0]["text"] == PROMPT
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == len(PROMPT_IDS)


def _check_logprobs(lps: dict[str, Any], text: str, k: int) -> None:
    tokens = lps["tokens"]
    assert len(tokens) == len(lps["token_logprobs"]) == len(lps["top_logprobs"])
    assert len(tokens) == len(lps["text_offset"])
    assert "".join(tokens) == text
    assert lps["text_offset"] == sorted(lps["text_offset"])
    for token, value, top in zip(tokens, lps["token_logprobs"], lps["top_logprobs"], strict=True):
        assert value <= 0.0
        assert top[token] == value  # the sampled token is always listed
        assert k <= len(top) <= k + 1
        assert max(top.values()) >= value


def test_logprobs(http: httpx.Client, greedy: dict[str, Any]) -> None:
    body = post(http, prompt=PROMPT, logprobs=2, **GREEDY)
    choice = body["choices"][0]
    assert choice["text"] == greedy_text(greedy)
    _check_logprobs(choice["logprobs"], choice["text"], 2)
    # greedy: the chosen token is the most likely one
    for value, top in zip(
        choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"], strict=True
    ):
        assert value == max(top.values())
    assert choice["logprobs"]["text_offset"][0] == 0


def test_echo_with_logprobs(http: httpx.Client, greedy: dict[str, Any]) -> None:
    """Prompt tokens are listed with null logprobs (documented); generated ones follow."""
    body = post(http, prompt=PROMPT, echo=True, logprobs=1, **GREEDY)
    choice = body["choices"][0]
    lps = choice["logprobs"]
    n_prompt = len(PROMPT_IDS)
    assert "".join(lps["tokens"][:n_prompt]) == PROMPT
    assert lps["token_logprobs"][:n_prompt] == [None] * n_prompt
    assert lps["top_logprobs"][:n_prompt] == [None] * n_prompt
    assert lps["text_offset"][n_prompt] == len(PROMPT)
    generated = {key: value[n_prompt:] for key, value in lps.items()}
    _check_logprobs(generated, greedy_text(greedy), 1)


def test_stream_echo_logprobs(http: httpx.Client, greedy: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "stream": True,
        "echo": True,
        "logprobs": 1,
        **GREEDY,
    }
    with http.stream("POST", "/v1/completions", json=body) as r:
        payloads = sse_data(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        validate(chunk)
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert all("usage" not in c for c in chunks)  # no include_usage
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == PROMPT + greedy_text(greedy)
    tokens = [
        t
        for c in chunks
        if c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["tokens"]
    ]
    assert "".join(tokens) == text


def test_stop(http: httpx.Client, greedy: dict[str, Any]) -> None:
    text = greedy_text(greedy)
    cut = text.strip()[-1]  # a character the greedy text is known to contain
    body = post(http, prompt=PROMPT, stop=[cut], **GREEDY)
    choice = body["choices"][0]
    assert choice["text"] == text[: text.index(cut)]
    assert choice["finish_reason"] == "stop"


def test_seed_is_reproducible(http: httpx.Client) -> None:
    fields = {"prompt": PROMPT, "temperature": 1.0, "seed": 1234, "max_tokens": 3}
    assert post(http, **fields)["choices"][0]["text"] == post(http, **fields)["choices"][0]["text"]


# --------------------------------------------------------------------------- errors


def _ok(**extra: Any) -> dict[str, Any]:
    return {"json": {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, **extra}}


ERROR_CASES = [
    pytest.param({"content": b"{not json"}, 400, None, id="invalid-json"),
    pytest.param({"content": b"[1, 2]"}, 400, None, id="json-array-body"),
    pytest.param(
        {"content": b"prompt=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        400,
        None,
        id="form-content-type",
    ),
    pytest.param({"json": {"model": MODEL}}, 400, "prompt", id="missing-prompt"),
    pytest.param(_ok(prompt=12), 400, "prompt", id="prompt-number"),
    pytest.param(_ok(prompt={"text": "hi"}), 400, "prompt", id="prompt-object"),
    pytest.param(_ok(prompt=[]), 400, "prompt", id="prompt-empty-list"),
    pytest.param(_ok(prompt=""), 400, "prompt", id="prompt-empty-string"),
    pytest.param(_ok(prompt=[1, "a"]), 400, "prompt", id="prompt-mixed"),
    pytest.param(_ok(prompt=[[]]), 400, "prompt", id="prompt-empty-ids"),
    pytest.param(_ok(prompt=[[1, "a"]]), 400, "prompt", id="prompt-bad-ids"),
    pytest.param(_ok(prompt=[True]), 400, "prompt", id="prompt-bool-id"),
    pytest.param(_ok(prompt=[-1]), 400, "prompt", id="prompt-negative-id"),
    pytest.param(_ok(prompt=[10**9]), 400, "prompt", id="prompt-id-out-of-vocab"),
    pytest.param(_ok(prompt=[1] * 9000), 400, "prompt", id="prompt-longer-than-context"),
    pytest.param(_ok(max_tokens=-1), 400, "max_tokens", id="max-tokens-negative"),
    pytest.param(_ok(max_tokens="5"), 400, "max_tokens", id="max-tokens-string"),
    pytest.param(_ok(temperature=3), 400, "temperature", id="temperature-3"),
    pytest.param(_ok(top_p=1.5), 400, "top_p", id="top-p-1.5"),
    pytest.param(_ok(logprobs=6), 400, "logprobs", id="logprobs-6"),
    pytest.param(_ok(logprobs=True), 400, "logprobs", id="logprobs-bool"),
    pytest.param(_ok(n=0), 400, "n", id="n-0"),
    pytest.param(_ok(best_of=2), 400, "best_of", id="best-of-not-n"),
    pytest.param(_ok(suffix="!"), 400, "suffix", id="suffix"),
    pytest.param(_ok(suffix=3), 400, "suffix", id="suffix-number"),
    pytest.param(_ok(echo="yes"), 400, "echo", id="echo-string"),
    pytest.param(_ok(stream="yes"), 400, "stream", id="stream-string"),
    pytest.param(_ok(stop=5), 400, "stop", id="stop-number"),
    pytest.param(_ok(stop=["a", "b", "c", "d", "e"]), 400, "stop", id="stop-five"),
    pytest.param(_ok(seed="x"), 400, "seed", id="seed-string"),
    pytest.param(
        _ok(stream_options={"include_usage": True}), 400, "stream_options", id="options-no-stream"
    ),
    pytest.param(_ok(model="gpt-4o"), 404, "model", id="unknown-model"),
]


@pytest.mark.parametrize(("kwargs", "status", "param"), ERROR_CASES)
def test_errors(http: httpx.Client, kwargs: dict[str, Any], status: int, param: str | None) -> None:
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", None)
    if "content" in kwargs and headers is None:
        headers = {"content-type": "application/json"}
    r = http.post("/v1/completions", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    openapi.validate("ErrorResponse", body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if kwargs.get("json", {}).get("prompt") == [1] * 9000:
        assert error["code"] == "context_length_exceeded"
    if status == 404:
        assert error["code"] == "model_not_found"


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt=PROMPT, logprobs=9)
    assert excinfo.value.param == "logprobs"
