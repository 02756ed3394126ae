"""Structured output: `response_format` enforced by constrained decoding (`engine.constrain`).

Unit tests of the constraint module against the default model's tokenizer, the batch engine on
a tiny random-weight model (a random model under a grammar still writes valid JSON), and end to
end against real servers: a tiny model for many samples, the default model for a short one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import trio

from mlx_server.engine import constrain
from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import LoadedModel, load
from mlx_server.engine.tokenizer import Tokenizer
from mlx_server.messages import (
    Admit,
    ConstraintSpec,
    GenerationRequest,
    SamplingParams,
    SequenceFinished,
    TokenOut,
)
from mlx_server.testing import openapi, streams
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model, default_tokenizer

# Bounded strings and arrays: any walk through the grammar closes within a few dozen tokens.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "active"],
    "additionalProperties": False,
}
TIMEOUT = httpx.Timeout(180.0, connect=10.0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def allowed_ids(c: constrain.Constraint, width: int) -> set[int]:
    return set(np.flatnonzero(c.allowed(width)).tolist())


# --------------------------------------------------------------------------- the module


def test_valid_output_is_allowed_token_by_token(tok: Tokenizer) -> None:
    c = constrain.start(ConstraintSpec.json_schema(PERSON), tok)
    text = '{"name":"Ada","age":36,"role":"admin","tags":["x","yz"],"active":true}'
    eos = min(tok.eos_token_ids)
    for t in tok.encode(text):
        allowed = allowed_ids(c, tok.vocab_size)
        assert t in allowed, tok.decode([t])
        assert eos not in allowed  # EOS only where the grammar accepts
        assert c.advance(t)
    assert c.accepting and c.done and c.error is None


def test_mask_forbids_wrong_tokens_and_padding(tok: Tokenizer) -> None:
    c = constrain.start(ConstraintSpec.json_object(), tok)
    width = tok.vocab_size + 64  # models pad their output layer beyond the tokenizer
    mask = c.allowed(width)
    assert mask.shape == (width,) and mask.dtype == np.bool_
    assert not mask[tok.vocab_size :].any()
    assert mask[tok.encode("{")[0]]
    assert not mask[tok.encode("hello")[0]]
    assert not c.advance(tok.encode("hello")[0])
    assert c.done and c.error is not None


def test_eos_allowed_once_the_grammar_accepts(tok: Tokenizer) -> None:
    c = constrain.start(ConstraintSpec.regex(r"[0-9]{1,3}"), tok)
    eos = min(tok.eos_token_ids)
    assert eos not in allowed_ids(c, tok.vocab_size)
    assert c.advance(tok.encode("7")[0])
    assert eos in allowed_ids(c, tok.vocab_size)
    assert not c.done


def test_lark_grammar_with_embedded_schema_for_tool_calls(tok: Tokenizer) -> None:
    args = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    grammar = 'start: "<tool_call>" %json ' + json.dumps(args) + ' "</tool_call>"'
    c = constrain.start(ConstraintSpec.lark(grammar), tok)
    for t in tok.encode('<tool_call>{"city":"Paris"}</tool_call>'):
        assert t in allowed_ids(c, tok.vocab_size), tok.decode([t])
        assert c.advance(t)
    assert c.done and c.accepting


def test_checked_specs_are_cached_but_matchers_are_fresh(tok: Tokenizer) -> None:
    spec = ConstraintSpec.json_schema({"type": "integer"})
    constrain.check(spec, tok)
    a = constrain.start(spec, tok)
    b = constrain.start(spec, tok)
    assert a.advance(tok.encode("4")[0])
    assert not b.accepting and a.accepting


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (ConstraintSpec.json_schema({"type": "object", "not": {"type": "null"}}), "not"),
        (ConstraintSpec.json_schema({"type": "wat"}), "wat"),
        (ConstraintSpec.json_schema({"type": "string", "format": "shoe-size"}), "shoe-size"),
        (ConstraintSpec.json_schema("{not json"), "JSON schema"),
        (ConstraintSpec.regex("[0-9"), "regular expression"),
        (ConstraintSpec.lark("start: missing_rule"), "grammar"),
    ],
)
def test_unenforceable_specs_raise(tok: Tokenizer, spec: ConstraintSpec, fragment: str) -> None:
    with pytest.raises(constrain.ConstraintError, match=fragment):
        constrain.check(spec, tok)


# --------------------------------------------------------------------------- the batch engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path, "llama")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load(str(tiny_dir))


def run_engine(loaded: LoadedModel, requests: list[GenerationRequest]) -> dict[str, Any]:
    engine = BatchEngine(
        loaded.model,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        vocab_size=loaded.tokenizer.vocab_size,
        tokenizer=loaded.tokenizer,
    )
    out: dict[str, Any] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.admit(Admit(request=r))
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                out[ev.request_id].append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                out[ev.request_id] = (out[ev.request_id], ev.finish_reason)
    return out


@pytest.mark.slow  # runs long: several seconds of CPU
def test_constrained_rows_batch_with_unconstrained_ones(tiny: LoadedModel) -> None:
    prompt = tuple(tiny.tokenizer.encode("Describe a person"))
    greedy = SamplingParams(temperature=0.0)

    def req(rid: str, sampling: SamplingParams, spec: ConstraintSpec | None) -> GenerationRequest:
        return GenerationRequest(
            request_id=rid, prompt_ids=prompt, sampling=sampling, max_tokens=120, constraint=spec
        )

    spec = ConstraintSpec.json_schema(PERSON)
    alone = run_engine(tiny, [req("plain", greedy, None)])["plain"]
    mixed = run_engine(
        tiny,
        [
            req("c0", SamplingParams(temperature=1.0, seed=1), spec),
            req("plain", greedy, None),
            req("c1", greedy, spec),
            req("c2", SamplingParams(temperature=1.0, seed=2, top_p=0.9), spec),
        ],
    )
    assert mixed["plain"] == alone  # an unconstrained row is untouched by its neighbours
    for rid in ("c0", "c1", "c2"):
        tokens, reason = mixed[rid]
        assert reason == "stop"
        jsonschema.validate(json.loads(tiny.tokenizer.decode(tokens)), PERSON)


def test_constraint_with_bias_penalties_and_logprobs(tiny: LoadedModel) -> None:
    prompt = tuple(tiny.tokenizer.encode("Describe a person"))
    quote = tiny.tokenizer.encode('"')[0]
    sampling = SamplingParams(
        temperature=0.7,
        seed=3,
        logit_bias=((quote, -100.0),),  # fights the grammar: the grammar wins
        repetition_penalty=1.3,
        logprobs=True,
        top_logprobs=2,
    )
    request = GenerationRequest(
        request_id="r",
        prompt_ids=prompt,
        sampling=sampling,
        max_tokens=120,
        constraint=ConstraintSpec.json_schema(PERSON),
    )
    engine = BatchEngine(
        tiny.model,
        eos_token_ids=tiny.tokenizer.eos_token_ids,
        vocab_size=tiny.tokenizer.vocab_size,
        tokenizer=tiny.tokenizer,
    )
    engine.admit(Admit(request=request))
    tokens: list[TokenOut] = []
    finished: list[SequenceFinished] = []
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens.append(ev)
            elif isinstance(ev, SequenceFinished):
                finished.append(ev)
    assert finished[0].finish_reason == "stop"
    jsonschema.validate(json.loads(tiny.tokenizer.decode([t.token_id for t in tokens])), PERSON)
    for t in tokens:  # logprobs of the masked distribution: the chosen token is possible
        assert t.logprob is not None and t.logprob > -1e9
        assert len(t.top_logprobs) == 2


# --------------------------------------------------------------------------- a real tiny server


@pytest.fixture(scope="module")
def tiny_server(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("srv") / "server.log"
    with run_server(["--model", str(tiny_dir)], log_path=log) as server:
        yield server


def person_format(**extra: Any) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True, **extra},
    }


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], **fields}


async def stream_choices(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[int, Any]:
    """(text, finish_reason) per choice of a streamed chat completion, every chunk validated and
    the stream's order checked."""
    chunks: list[dict[str, Any]] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    choices = streams.check_chat_stream(chunks)
    return {i: (c.content, c.finish_reason) for i, c in choices.items()}


def completion(r: httpx.Response) -> dict[str, Any]:
    """A chat completion's body, validated."""
    assert r.status_code == 200, r.text
    openapi.validate("openai.ChatCompletion", r.json())
    return r.json()


async def test_twenty_samples_at_temperature_1_all_validate(tiny_server: ServerProcess) -> None:
    body = chat(
        "Make up a person.",
        response_format=person_format(),
        temperature=1.0,
        max_tokens=200,
        n=10,
    )
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=TIMEOUT) as client:
        r = await client.post("/v1/chat/completions", json=body)
        choices = completion(r)["choices"]
        whole = [(c["message"]["content"], c["finish_reason"]) for c in choices]
        streamed = list((await stream_choices(client, {**body, "stream": True})).values())
    samples = whole + streamed
    assert len(samples) == 20
    for text, reason in samples:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for text, _ in samples}) > 1  # sampled, not one forced string


async def test_constrained_and_unconstrained_concurrently(tiny_server: ServerProcess) -> None:
    plain = chat("Tell me about cats", temperature=0, max_tokens=24)
    shaped = chat(
        "Tell me about cats", temperature=0, max_tokens=200, response_format=person_format()
    )
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=TIMEOUT) as client:
        alone = (await client.post("/v1/chat/completions", json=plain)).json()
        results: dict[str, Any] = {}

        async def post(name: str, body: dict[str, Any]) -> None:
            results[name] = await client.post("/v1/chat/completions", json=body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, "shaped", shaped)
            nursery.start_soon(post, "plain", plain)
    plain_choice = completion(results["plain"])["choices"][0]
    assert plain_choice["message"] == alone["choices"][0]["message"]
    shaped_text = completion(results["shaped"])["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(shaped_text), PERSON)


async def test_completions_route_takes_response_format(tiny_server: ServerProcess) -> None:
    body = {
        "model": "tiny-llama",
        "prompt": "A person:",
        "max_tokens": 200,
        "temperature": 1.0,
        "n": 2,
        "response_format": person_format(),
    }
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=TIMEOUT) as client:
        r = await client.post("/v1/completions", json=body)
        bad = await client.post(
            "/v1/completions", json={**body, "response_format": {"type": "yaml"}}
        )
    assert r.status_code == 200, r.text
    openapi.validate("openai.Completion", r.json())
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), PERSON)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    openapi.validate("openai.ErrorResponse", bad.json())


async def test_text_format_is_plain_generation(tiny_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=TIMEOUT) as client:
        r = await client.post(
            "/v1/chat/completions",
            json=chat("hi", max_tokens=4, temperature=0, response_format={"type": "text"}),
        )
        untyped = await client.post(
            "/v1/chat/completions", json=chat("hi", max_tokens=4, response_format={})
        )
    assert r.status_code == 200, r.text
    assert untyped.status_code == 200, untyped.text  # no type: text, as before


@pytest.mark.parametrize(
    ("response_format", "fragment"),
    [
        ("json", "must be an object"),
        ({"type": "xml"}, "must be one of"),
        ({"type": "json_schema"}, "json_schema' is required"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema' is required"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict"),
        (person_format() | {"json_schema": {"schema": {"not": {}}}}, "cannot be enforced"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "("}}},
            "cannot be enforced",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}},
            "cannot be enforced",
        ),
    ],
)
async def test_bad_response_format_is_400(
    tiny_server: ServerProcess, response_format: Any, fragment: str
) -> None:
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=TIMEOUT) as client:
        for stream in (False, True):
            r = await client.post(
                "/v1/chat/completions",
                json=chat("hi", max_tokens=4, response_format=response_format, stream=stream),
            )
            assert r.status_code == 400, r.text
            openapi.validate("openai.ErrorResponse", r.json())
            error = r.json()["error"]
            assert error["param"] == "response_format"
            assert error["type"] == "invalid_request_error"
            assert fragment in error["message"]


# --------------------------------------------------------------------------- the default model


@pytest.mark.slow
async def test_json_object_with_the_default_model(default_server: ServerProcess) -> None:
    messages = [{"role": "user", "content": 'Give the capital of France as JSON: {"capital": ...}'}]
    body = {
        "model": "default",
        "messages": messages,
        "temperature": 0,
        "max_tokens": 24,
        "response_format": {"type": "json_object"},
    }
    async with httpx.AsyncClient(base_url=default_server.base_url, timeout=TIMEOUT) as client:
        r = await client.post("/v1/chat/completions", json=body)
        choice = completion(r)["choices"][0]
        streamed = await stream_choices(client, {**body, "stream": True})
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    assert streamed[0] == (choice["message"]["content"], "stop")
