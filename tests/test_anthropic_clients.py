"""End to end, the real server process and the official `anthropic` SDK, with requests shaped as
today's clients send them (Claude Code, `messages.parse`), on a tiny random-weight model (fast:
many samples at temperature 1; a random model under a grammar still writes valid output).

- structured output: `messages.parse` with a pydantic output type, `output_config.format` and
  the older `output_format`, every sample valid;
- a five-turn agent session as Claude Code drives it (a billing header that changes every
  request, mid-conversation system entries, adaptive thinking with effort, context_management,
  a forced Bash call each turn and its result): the prefix cache serves the earlier
  conversation, reported as `cache_read_input_tokens` (the hit rate per turn is printed:
  `pytest tests/test_anthropic_clients.py -k agent_session -s`);
- `thinking` blocks in history reach the template (count_tokens differs with and without);
- `/v1/models` in Anthropic's shape for the SDK;
- bad input: a schema the engine cannot enforce, a prompt over the context (Anthropic's
  wording), malformed blocks: 4xx in Anthropic's shape, never a 5xx, and the server serves on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import pydantic
import pytest

from mlx_server.testing import openapi
from mlx_server.testing.agent_session import check_prefix_reuse, hit_rates, run_agent_session
from mlx_server.testing.schemas import Contract, build
from mlx_server.testing.scripted import build_scripted_model
from mlx_server.testing.server import ServerProcess, run_server

pytestmark = pytest.mark.slow

MODEL = "tiny-thinker"
HEADERS = {"x-api-key": "x", "anthropic-version": "2023-06-01"}
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
HOT: dict[str, Any] = {"extra_body": {"temperature": 1.0}}  # the SDK has no temperature

# ChatML that shows an assistant turn's reasoning (as Qwen3's does within a tool loop) and
# renders system turns wherever they stand; tools come through the generic tool prompt.
TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.role == 'assistant' and message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


class Verdict(pydantic.BaseModel):
    """Only bounded fields: the SDK moves length limits into descriptions, and a random model
    does not choose to close a free string."""

    label: Literal["spam", "ham", "unsure"]
    flagged: bool
    votes: list[Literal["a", "b"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("anthropic-clients")
    model_dir = build_scripted_model(root / MODEL, TEMPLATE)
    with run_server(["--model", str(model_dir)], log_path=root / "server.log") as server:
        yield server


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


def assert_anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    openapi.validate("anthropic.ErrorResponse", body)
    assert body["error"]["type"] == kind
    return body["error"]["message"]


def still_serving(http: httpx.Client) -> None:
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    openapi.validate("anthropic.Message", r.json())


# --------------------------------------------------------------------------- structured output


def test_messages_parse_with_a_pydantic_type(client: anthropic.Anthropic) -> None:
    for _ in range(4):
        message = client.messages.parse(
            model=MODEL,
            max_tokens=120,
            messages=[{"role": "user", "content": "Classify: 'WIN A PRIZE NOW'"}],
            output_format=Verdict,
            **HOT,
        )
        assert message.stop_reason == "end_turn"
        assert isinstance(message.parsed_output, Verdict)
        openapi.validate("anthropic.Message", message.model_dump(mode="json"))


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_raw_output_format_fields(http: httpx.Client, field: str) -> None:
    schema = {**Verdict.model_json_schema(), "additionalProperties": False}
    fmt = {"type": "json_schema", "schema": schema}
    body = {
        "model": MODEL,
        "max_tokens": 120,
        "temperature": 1.0,
        "messages": [{"role": "user", "content": "Classify this."}],
        field: {"format": fmt} if field == "output_config" else fmt,
    }
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    openapi.validate("anthropic.Message", r.json())
    [block] = r.json()["content"]
    jsonschema.validate(json.loads(block["text"]), schema)


def test_streamed_structured_output(client: anthropic.Anthropic) -> None:
    schema = {**Verdict.model_json_schema(), "additionalProperties": False}
    with client.messages.stream(
        model=MODEL,
        max_tokens=120,
        messages=[{"role": "user", "content": "Classify this."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        **HOT,
    ) as stream:
        text = "".join(stream.text_stream)
    jsonschema.validate(json.loads(text), schema)


# --------------------------------------------------------------------------- an agent session


def test_agent_session_reads_the_earlier_conversation_from_the_cache(
    http: httpx.Client,
) -> None:
    usage = run_agent_session(http, 5, MODEL)
    check_prefix_reuse(usage)
    assert min(hit_rates(usage)[1:]) > 0.8, usage


# --------------------------------------------------------------------------- history, models


def test_thinking_blocks_in_history_reach_the_template(http: httpx.Client) -> None:
    def count(assistant: list[dict[str, Any]]) -> int:
        body = {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": assistant},
                {"role": "user", "content": "And 3+3?"},
            ],
        }
        r = http.post("/v1/messages/count_tokens", json=body)
        assert r.status_code == 200, r.text
        return r.json()["input_tokens"]

    answer = {"type": "text", "text": "4"}
    thought = {"type": "thinking", "thinking": "Two and two make four.", "signature": "x"}
    redacted = {"type": "redacted_thinking", "data": "opaque"}
    assert count([thought, answer]) > count([answer])
    assert count([redacted, answer]) == count([answer])


def test_models_in_anthropic_shape(client: anthropic.Anthropic, server: ServerProcess) -> None:
    page = client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    assert page.data[0].type == "model"
    info = client.models.retrieve(MODEL)
    assert info.id == MODEL and info.display_name == MODEL
    schema = build(Contract(name="anthropic.ModelInfo", source=anthropic.types.ModelInfo))
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=TIMEOUT) as http:
        raw = http.get("/v1/models").json()
        assert set(raw) == {"data", "has_more", "first_id", "last_id"}
        assert raw["first_id"] == raw["last_id"] == MODEL and raw["has_more"] is False
        for item in raw["data"]:
            jsonschema.validate(item, schema)
        jsonschema.validate(http.get(f"/v1/models/{MODEL}").json(), schema)
        missing = http.get("/v1/models/no-such-model")
        assert_anthropic_error(missing, 404, "not_found_error")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")
    # Without anthropic-version: OpenAI's list, as before.
    plain = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer x"})
    assert plain.json()["object"] == "list"


# --------------------------------------------------------------------------- bad input


def test_a_schema_the_engine_cannot_enforce_is_a_400(http: httpx.Client) -> None:
    for fmt_field in ("output_config", "output_format"):
        fmt = {"type": "json_schema", "schema": {"type": "object", "not": {"required": ["a"]}}}
        body = {
            "model": MODEL,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
            fmt_field: {"format": fmt} if fmt_field == "output_config" else fmt,
            "stream": True,
        }
        message = assert_anthropic_error(
            http.post("/v1/messages", json=body), 400, "invalid_request_error"
        )
        assert "cannot be enforced" in message
    still_serving(http)


def test_prompt_over_the_context_in_anthropics_words(
    client: anthropic.Anthropic, http: httpx.Client
) -> None:
    long = "word " * 5000  # the tiny model's context is 4096 tokens
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": long}]}
    tokens = http.post("/v1/messages/count_tokens", json=body).json()["input_tokens"]
    assert tokens > 4096
    for stream in (False, True):
        r = http.post("/v1/messages", json={**body, "stream": stream})
        message = assert_anthropic_error(r, 400, "invalid_request_error")
        assert message == f"prompt is too long: {tokens} tokens > 4096 maximum"
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        client.messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": long}]
        )
    still_serving(http)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}],
        [{"role": "system", "content": [{"type": "image", "source": {}}]}],
        [{"role": "system", "content": 5}],
        [{"role": "user", "content": [{"type": "thinking"}]}, {"role": "narrator", "content": ""}],
        [{"role": "user", "content": [{"text": "no type"}]}],
    ],
)
def test_malformed_messages_are_400(http: httpx.Client, messages: list[dict[str, Any]]) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": messages}
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert_anthropic_error(http.post(path, json=body), 400, "invalid_request_error")


@pytest.mark.parametrize(
    "extra",
    [
        {"thinking": {"type": "adaptive", "display": "sometimes"}},
        {"output_config": {"effort": "ultra"}},
        {"output_config": {"format": {"type": "json_schema"}}},
        {"output_format": {"type": "json_object", "schema": {}}},
    ],
)
def test_malformed_settings_are_400(http: httpx.Client, extra: dict[str, Any]) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    r = http.post("/v1/messages", json={**body, **extra})
    assert_anthropic_error(r, 400, "invalid_request_error")
