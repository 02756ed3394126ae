"""The API's request contract and the dialect-neutral generation path, in process (fast):
field errors -> `param` paths, strict types, the generated OpenAPI document against the models,
sampling defaults, fan-out seeds, and `count_tokens` == the prompt `prepare` builds."""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import pytest
import referencing
import referencing.jsonschema
import trio

from mlx_server.actors.cache import CacheManager
from mlx_server.actors.frontend import Frontend
from mlx_server.actors.scheduler import Scheduler
from mlx_server.api.anthropic import convert as anthropic_convert
from mlx_server.api.anthropic.protocol import CountTokensRequest, MessagesRequest
from mlx_server.api.openai import convert as openai_convert
from mlx_server.api.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from mlx_server.api.openapi import openapi_document
from mlx_server.api.protocol import Model, parse_bytes
from mlx_server.errors import InvalidRequest
from mlx_server.generation import Sampling, choice_requests, count_tokens, prepare
from mlx_server.generation.request import resolve_sampling
from mlx_server.messages import SamplingParams
from mlx_server.testing.fakes import FakeExecutor, fake_loaded_model, tiny_tokenizer

USER = [{"role": "user", "content": "hi"}]


def error(model: type[Model], body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_bytes(model, json.dumps(body))
    return info.value


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": USER, "temperature": 5}, "temperature", "at most 2"),
        ({"messages": USER, "max_tokens": "5"}, "max_tokens", "must be an integer"),
        ({"messages": USER, "stream": 1}, "stream", "must be a boolean"),
        ({"messages": []}, "messages", "must not be empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text", "is required"),
        ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
         "messages[1].tool_calls[0].function.name", "is required"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format", "one of"),
        ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias", "must match"),
        ({"messages": USER, "stop": ["a"] * 5}, "stop", "at most 4"),
        ({"messages": USER, "top_p": float("nan")}, "top_p", "finite"),
    ],
)  # fmt: skip
def test_chat_field_errors_name_their_path(body: Any, param: str, fragment: str) -> None:
    exc = error(ChatCompletionRequest, body)
    assert exc.param == param and exc.status == 400, exc.message
    assert fragment in exc.message, exc.message


def test_whole_body_errors() -> None:
    for raw, fragment in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object")):
        with pytest.raises(InvalidRequest) as info:
            parse_bytes(ChatCompletionRequest, raw)
        assert fragment in info.value.message and info.value.param is None


def test_union_fields_name_the_field() -> None:
    assert error(CompletionRequest, {"prompt": [1, "a"]}).param == "prompt"
    assert error(CompletionRequest, {"prompt": [[]]}).param == "prompt"
    assert error(EmbeddingRequest, {"input": ["a", ""]}).param == "input"
    assert error(EmbeddingRequest, {"input": ["a"] * 2049}).param == "input"


def test_anthropic_field_errors() -> None:
    base = {"model": "m", "max_tokens": 4, "messages": USER}
    assert error(MessagesRequest, {**base, "temperature": 1.5}).param == "temperature"
    bad_block = {"role": "user", "content": [{"type": {}, "text": "x"}]}  # a type not a string
    assert error(MessagesRequest, {**base, "messages": [bad_block]}).param == (
        "messages[0].content[0]"
    )
    assert error(MessagesRequest, {k: v for k, v in base.items() if k != "max_tokens"}).param == (
        "max_tokens"
    )


def test_json_numbers_and_defaults() -> None:
    body = parse_bytes(ChatCompletionRequest, b'{"messages": %s, "max_tokens": 5.0, "stop": "x"}'
                       % json.dumps(USER).encode())  # fmt: skip
    assert body.max_tokens == 5 and body.stop == ["x"]
    assert body.temperature is None  # omitted stays None: defaults come later, once
    fmt = parse_bytes(ChatCompletionRequest, json.dumps({"messages": USER, "response_format": {}}))
    assert openai_convert.response_format(fmt.response_format) is None  # no type: text


def test_cross_field_rules_are_the_converters() -> None:
    def convert(**extra: Any) -> InvalidRequest:
        body = parse_bytes(ChatCompletionRequest, json.dumps({"messages": USER, **extra}))
        with pytest.raises(InvalidRequest) as info:
            openai_convert.chat_request(body)
        return info.value

    assert convert(stream_options={"include_usage": True}).param == "stream_options"
    assert convert(top_logprobs=2).param == "top_logprobs"
    assert convert(tool_choice="required").param == "tool_choice"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    assert convert(messages=audio).param == "messages[0].content[0]"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]
    assert convert(messages=image).param == "messages[0].content[0].image_url"


def test_tool_calls_travel_as_objects() -> None:
    call = {"id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}]
    body = parse_bytes(ChatCompletionRequest, json.dumps({"messages": messages}))
    chat = openai_convert.chat_request(body).chat
    assert chat is not None
    (converted,) = chat[1].tool_calls
    assert converted.name == "f" and dict(converted.arguments) == {"a": 1} and converted.id == "c1"
    assert chat[1].template_json()["tool_calls"][0]["function"]["arguments"] == {"a": 1}


def test_resolve_sampling_applies_defaults_once() -> None:
    api = SamplingParams()
    assert resolve_sampling(Sampling(), None) == api
    model = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    resolved = resolve_sampling(Sampling(top_p=0.5), model)
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.6, 0.5, 20)
    assert resolve_sampling(Sampling(seed=-1), None).seed == 2**63 - 1


def test_generated_document_matches_the_models() -> None:
    """Example bodies the models accept are valid in the document; bodies they refuse for a
    type or range are invalid in it (the fuzzer's negative data depends on that)."""
    doc = openapi_document(model_names=["tiny", "default"], vocab_size=100)
    resource = referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resource("urn:d", resource)

    def valid(name: str, body: Any) -> bool:
        ref = {"$ref": f"urn:d#/components/schemas/{name}"}
        return jsonschema.Draft202012Validator(ref, registry=registry).is_valid(body)

    ok = {"model": "tiny", "messages": USER, "stop": "x", "temperature": 0, "max_tokens": 3}
    assert valid("ChatCompletionRequest", ok)
    for bad in ({"temperature": 5}, {"max_tokens": "5"}, {"stop": ["a"] * 5}, {"model": "gpt"}):
        assert not valid("ChatCompletionRequest", {**ok, **bad}), bad
    assert valid("CompletionRequest", {"prompt": [1, 99]})
    assert not valid("CompletionRequest", {"prompt": [1, 100]})  # beyond the vocabulary
    anthropic = {"model": "TINY", "max_tokens": 3, "messages": USER}
    assert valid("MessagesRequest", anthropic)
    assert not valid("MessagesRequest", {**anthropic, "temperature": 1.5})


# -- the generation path over a real Frontend (fake executor) --------------------------------


async def test_count_tokens_equals_prepared_prompt_and_fanout_seeds() -> None:
    tokenizer = tiny_tokenizer()
    fake = FakeExecutor(eos_token_ids=tokenizer.eos_token_ids)
    cache = CacheManager(0, fake.send)
    scheduler = Scheduler(fake.send, cache, max_running=2, max_waiting=2)
    async with trio.open_nursery() as nursery:
        frontend = Frontend(
            fake_loaded_model(tokenizer), scheduler, nursery, timeout=math.inf, default_max_tokens=8
        )
        body = {
            "model": "m",
            "max_tokens": 4,
            "system": "Be brief.",
            "messages": [*USER, {"role": "assistant", "content": "Hello"}],  # a prefill
        }
        request = anthropic_convert.messages_request(parse_bytes(MessagesRequest, json.dumps(body)))
        counted = anthropic_convert.messages_request(
            parse_bytes(CountTokensRequest, json.dumps(body))
        )
        prepared = await prepare(frontend, request)
        assert await count_tokens(frontend, counted) == prepared.prompt_tokens
        assert prepared.prompts[0].max_tokens == 4

        chat = {"messages": USER, "n": 3, "seed": 7, "max_tokens": 2}
        request = openai_convert.chat_request(parse_bytes(ChatCompletionRequest, json.dumps(chat)))
        prepared = await prepare(frontend, request)
        fanned = choice_requests(prepared)
        assert [r.sampling.seed for r in fanned] == [7, 8, 9]
        assert len({r.request_id for r in fanned}) == 3
        nursery.cancel_scope.cancel()
