"""Continuous batching through the real server: concurrent greedy requests give exactly the
tokens they give one at a time, and exactly mlx-lm's own generation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import mlx_lm
import pytest
import trio
from mlx_lm.generate import generate_step

from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

TOPICS = ["cats", "dogs", "the sea and the sky", "x", "prime numbers 1 2 3", "a", "bb", "ccc"]
N_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path, "llama")
    return path


@pytest.fixture(scope="module")
def tiny_server(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("srv") / "server.log"
    # A small prefill chunk so prompts are read across steps while other requests decode.
    with run_server(["--model", str(tiny_dir), "--prefill-chunk", "8"], log_path=log) as server:
        yield server


def body(topic: str) -> dict[str, object]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": f"Tell me about {topic}"}],
        "max_tokens": N_TOKENS,
        "temperature": 0,
    }


async def ask(client: httpx.AsyncClient, topic: str) -> dict[str, object]:
    r = await client.post("/v1/chat/completions", json=body(topic))
    assert r.status_code == 200, r.text
    return r.json()


async def test_concurrent_equals_sequential_equals_mlx_lm(
    tiny_server: ServerProcess, tiny_dir: Path
) -> None:
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as client:
        sequential = [await ask(client, t) for t in TOPICS]
        concurrent: dict[int, dict[str, object]] = {}

        async def one(i: int, t: str) -> None:
            concurrent[i] = await ask(client, t)

        async with trio.open_nursery() as nursery:
            for i, t in enumerate(TOPICS):
                nursery.start_soon(one, i, t)

    model, tok = mlx_lm.load(str(tiny_dir))
    eos = set(tok.eos_token_ids)
    for i, t in enumerate(TOPICS):
        seq_msg = sequential[i]["choices"][0]["message"]["content"]  # type: ignore[index]
        con_msg = concurrent[i]["choices"][0]["message"]["content"]  # type: ignore[index]
        assert con_msg == seq_msg, f"request {i} differs when batched"
        assert sequential[i]["usage"] == concurrent[i]["usage"] or (
            sequential[i]["usage"]["completion_tokens"]
            == concurrent[i]["usage"]["completion_tokens"]  # type: ignore[index]
        )
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": f"Tell me about {t}"}], add_generation_prompt=True
        )
        ref: list[int] = []
        for token, _ in generate_step(
            mx.array(prompt), model, max_tokens=N_TOKENS, sampler=lambda lp: mx.argmax(lp, axis=-1)
        ):
            if int(token) in eos:
                break
            ref.append(int(token))
        assert seq_msg == tok.decode(ref, skip_special_tokens=True), (
            f"request {i} differs from mlx-lm"
        )


async def test_n_choices_batch_together(tiny_server: ServerProcess) -> None:
    """n > 1: greedy choices are identical to the single answer; seeded sampled choices differ
    from each other yet the whole response is reproducible; usage counts the prompt once."""
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as client:
        single = await ask(client, "cats")
        r = await client.post("/v1/chat/completions", json={**body("cats"), "n": 3})
        assert r.status_code == 200, r.text
        multi = r.json()
        assert [c["index"] for c in multi["choices"]] == [0, 1, 2]
        text = single["choices"][0]["message"]["content"]  # type: ignore[index]
        assert all(c["message"]["content"] == text for c in multi["choices"])
        usage, one = multi["usage"], single["usage"]
        assert usage["prompt_tokens"] == one["prompt_tokens"]  # type: ignore[index]
        assert usage["completion_tokens"] == 3 * one["completion_tokens"]  # type: ignore[index]

        sampled = {**body("cats"), "n": 3, "temperature": 1.0, "seed": 11}
        a = (await client.post("/v1/chat/completions", json=sampled)).json()
        b = (await client.post("/v1/chat/completions", json=sampled)).json()
        texts = [c["message"]["content"] for c in a["choices"]]
        assert texts == [c["message"]["content"] for c in b["choices"]]
        assert len(set(texts)) == 3

        # Streaming: each choice gets its role delta, its content and one finish chunk.
        chunks = []
        async with client.stream(
            "POST", "/v1/chat/completions", json={**sampled, "stream": True}
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        streamed = ["", "", ""]
        finishes = [0, 0, 0]
        for chunk in chunks:
            for choice in chunk["choices"]:
                streamed[choice["index"]] += choice["delta"].get("content") or ""
                finishes[choice["index"]] += choice["finish_reason"] is not None
        assert streamed == texts
        assert finishes == [1, 1, 1]
