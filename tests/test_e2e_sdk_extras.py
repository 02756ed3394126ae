"""The openai SDK's extras against the real server (default model): the streaming helper,
`n` > 1, the `user` field, unknown fields, and seeded sampling.

Every request asks the same question with at most 8 new tokens, so after the first one the
server's prompt cache makes the prompt free and each test costs a few decode steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from mlx_server.testing.server import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
MAX_TOKENS = 8
GREEDY: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "temperature": 0}


@pytest.fixture(scope="module")
def client(default_server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=default_server.base_url + "/v1", api_key="x", max_retries=0, timeout=120.0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def greedy_text(client: openai.OpenAI) -> str:
    """The non-streaming greedy answer the other tests compare with. It ends by itself within
    MAX_TOKENS ("The capital of France is Paris." and the end token): the SDK's streaming
    helper refuses a completion cut by the token limit (LengthFinishReasonError)."""
    r = client.chat.completions.create(**GREEDY, max_tokens=MAX_TOKENS)
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    text = r.choices[0].message.content
    assert text
    return text


def test_stream_helper_gives_the_same_text_as_create(
    client: openai.OpenAI, greedy_text: str
) -> None:
    deltas: list[str] = []
    with client.chat.completions.stream(**GREEDY, max_tokens=MAX_TOKENS) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == greedy_text
    assert "".join(deltas) == greedy_text
    assert final.model == MODEL
    assert final.id.startswith("chatcmpl-")


def test_n_2_greedy_gives_two_identical_choices(client: openai.OpenAI, greedy_text: str) -> None:
    r = client.chat.completions.create(**GREEDY, max_tokens=MAX_TOKENS, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    texts = [c.message.content for c in r.choices]
    assert texts == [greedy_text, greedy_text]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    assert r.usage is not None  # the prompt counts once, both choices' tokens add up
    assert r.usage.completion_tokens % 2 == 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_user_field_is_accepted(client: openai.OpenAI, greedy_text: str) -> None:
    r = client.chat.completions.create(**GREEDY, max_tokens=MAX_TOKENS, user="user-1234")
    assert r.choices[0].message.content == greedy_text


def test_unknown_fields_are_ignored(client: openai.OpenAI, greedy_text: str) -> None:
    r = client.chat.completions.create(
        **GREEDY,
        max_tokens=MAX_TOKENS,
        extra_body={"some_unknown": 1, "another": {"nested": [1, 2]}},
    )
    assert r.choices[0].message.content == greedy_text


def test_seed_reproduces_a_sampled_answer(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=1, max_tokens=MAX_TOKENS, seed=seed
        )
        text = r.choices[0].message.content
        assert text is not None
        return text

    first = sample(1234)
    assert sample(1234) == first
    # Different seeds sample differently; one of a few must differ from the first.
    assert any(sample(seed) != first for seed in (1, 2, 3))
