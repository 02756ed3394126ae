"""Several models in one server: per-request selection, names, 404s, and the memory budget.

Two tiny random-weight models (a llama and a qwen2, different seeds) are served by one real
server process. Each request's greedy answer must equal mlx-lm's own generation with the model
the request named, alone and mixed concurrently. A second server gets a memory budget that
holds only one of them: asking for the other unloads the least recently used idle model, and a
model with a stream in flight is never unloaded (the other request waits for the stream).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import mlx.core as mx
import mlx_lm
import pytest
import trio
from mlx_lm.generate import generate_step

from mlx_server.engine.memory import weights_bytes
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

N_TOKENS = 12
TOPICS = ("cats", "the sea and the sky", "prime numbers 2 3 5 7")


def chat(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me about {topic}"}]


def reference(model_dir: Path, n: int = N_TOKENS) -> dict[str, str]:
    """mlx-lm's greedy answer to each topic (EOS ignored), as text."""
    model, tok = mlx_lm.load(str(model_dir))[:2]
    out: dict[str, str] = {}
    for topic in TOPICS:
        prompt = tok.apply_chat_template(chat(topic), add_generation_prompt=True)
        ids = [
            int(t)
            for t, _ in generate_step(
                mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
            )
        ]
        out[topic] = tok.decode(ids, skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {"alpha": root / "tiny-alpha", "beta": root / "tiny-beta"}
    build_tiny_model(out["alpha"], "llama", seed=0)
    build_tiny_model(out["beta"], "qwen2", seed=1)
    return out


@pytest.fixture(scope="module")
def refs(dirs: dict[str, Path]) -> dict[str, dict[str, str]]:
    return {name: reference(path) for name, path in dirs.items()}


def _env() -> dict[str, str]:
    return {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}


@pytest.fixture(scope="module")
def server(
    dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Both models; the first by its directory name, the second named on the command line."""
    log = tmp_path_factory.mktemp("two-models") / "server.log"
    args = ["--model", str(dirs["alpha"]), "--model", f"beta={dirs['beta']}"]
    with run_server([*args, "--model-aliases", "gpt-*"], env=_env(), log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def tight_server(
    dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A budget that holds one of the two models at a time."""
    one = max(weights_bytes(p) for p in dirs.values())
    log = tmp_path_factory.mktemp("tight") / "server.log"
    args = ["--model", str(dirs["alpha"]), "--model", f"beta={dirs['beta']}"]
    with run_server(
        [*args, "--model-memory-bytes", str(int(one * 1.5))], env=_env(), log_path=log
    ) as srv:
        yield srv


async def ask(
    client: httpx.AsyncClient, model: str | None, topic: str, n: int = N_TOKENS
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": chat(topic),
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
    }
    if model is not None:
        body["model"] = model
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def content(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


async def test_models_are_listed_by_their_stable_names(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        r = await client.get("/v1/models")
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]] == ["tiny-alpha", "beta"]
        r = await client.get("/v1/models/beta")
        assert r.status_code == 200 and r.json()["id"] == "beta"
        r = await client.get("/v1/models/gamma")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        health = (await client.get("/health")).json()
        assert health["model"] == "tiny-alpha"
        assert {m["id"]: m["loaded"] for m in health["models"]} == {
            "tiny-alpha": True,
            "beta": True,
        }


async def test_each_request_gets_the_model_it_names(
    server: ServerProcess, refs: dict[str, dict[str, str]]
) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        for name, model in (("alpha", "tiny-alpha"), ("beta", "beta")):
            answer = await ask(client, model, TOPICS[0])
            assert answer["model"] == model
            assert content(answer) == refs[name][TOPICS[0]]
        # No model, "default" and the default model's aliases mean the first model.
        for model in (None, "default", "gpt-4o", "TINY-ALPHA"):
            answer = await ask(client, model, TOPICS[0])
            assert answer["model"] == "tiny-alpha"
            assert content(answer) == refs["alpha"][TOPICS[0]]

        # Mixed concurrently: both models generate at once, each answer from its own model.
        answers: dict[tuple[str, str], str] = {}

        async def one(name: str, model: str, topic: str) -> None:
            answers[(name, topic)] = content(await ask(client, model, topic))

        async with trio.open_nursery() as nursery:
            for topic in TOPICS:
                nursery.start_soon(one, "alpha", "tiny-alpha", topic)
                nursery.start_soon(one, "beta", "beta", topic)
    for (name, topic), text in answers.items():
        assert text == refs[name][topic], (name, topic)
    assert refs["alpha"][TOPICS[0]] != refs["beta"][TOPICS[0]]


async def test_unknown_model_is_404_in_each_api_shape(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        r = await client.post(
            "/v1/chat/completions", json={"model": "gamma", "messages": chat("x")}
        )
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "model_not_found" and "'beta'" in error["message"]
    client = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(
            model="gamma", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    # The Anthropic API reaches the second model by name too.
    message = client.messages.create(
        model="beta", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.model == "beta"


async def test_budget_unloads_the_least_recently_used_idle_model(
    tight_server: ServerProcess, refs: dict[str, dict[str, str]]
) -> None:
    async def loaded(client: httpx.AsyncClient) -> dict[str, bool]:
        health = (await client.get("/health")).json()
        return {m["id"]: m["loaded"] for m in health["models"]}

    async with httpx.AsyncClient(base_url=tight_server.base_url, timeout=120) as client:
        assert await loaded(client) == {"tiny-alpha": True, "beta": False}
        assert content(await ask(client, "beta", TOPICS[1])) == refs["beta"][TOPICS[1]]
        assert await loaded(client) == {"tiny-alpha": False, "beta": True}
        assert content(await ask(client, "tiny-alpha", TOPICS[1])) == refs["alpha"][TOPICS[1]]
        assert await loaded(client) == {"tiny-alpha": True, "beta": False}
        models = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["tiny-alpha", "beta"]  # loaded or not


async def test_a_model_with_a_stream_in_flight_is_not_unloaded(
    tight_server: ServerProcess, refs: dict[str, dict[str, str]]
) -> None:
    """A long stream on alpha, then a request for beta: beta waits for the stream to end
    (alpha is never unloaded under it), then loads and answers correctly."""
    events: list[str] = []
    async with httpx.AsyncClient(base_url=tight_server.base_url, timeout=120) as client:
        await ask(client, "tiny-alpha", TOPICS[0], n=1)  # alpha loaded (and most recent)
        long_tokens = 150
        first_chunk = trio.Event()
        streamed: list[str] = []

        async def stream_alpha() -> None:
            body = {
                "model": "tiny-alpha",
                "messages": chat(TOPICS[2]),
                "max_tokens": long_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        streamed.append(str(chunk["usage"]["completion_tokens"]))
                    first_chunk.set()
            events.append("alpha done")

        async def ask_beta() -> None:
            await first_chunk.wait()
            answer = await ask(client, "beta", TOPICS[0])
            events.append("beta answered")
            assert content(answer) == refs["beta"][TOPICS[0]]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_alpha)
            nursery.start_soon(ask_beta)
    assert events == ["alpha done", "beta answered"]
    assert streamed == [str(long_tokens)]


def test_model_flags_env_and_names(tmp_path: Path) -> None:
    from mlx_server.actors.pool import make_slots, split_model_arg
    from mlx_server.config import load_settings
    from mlx_server.errors import ConfigError

    s = load_settings(["--model", "a/b", "--model", "coder=c/d", "--model-memory-bytes", "2G"], {})
    assert s.models == ("a/b", "coder=c/d") and s.model_memory_bytes == 2 << 30
    assert [x.name for x in make_slots(s)] == ["a/b", "coder"]
    s = load_settings([], {"MLX_SERVER_MODEL": "a/b, x/y"})
    assert s.models == ("a/b", "x/y")
    assert load_settings([], {}).models == (None,)
    # A flag overrides the environment as a whole.
    assert load_settings(["--model", "q/r"], {"MLX_SERVER_MODEL": "a/b,x/y"}).models == ("q/r",)
    with pytest.raises(SystemExit):
        load_settings(["--model", "a/b", "--model", "a/b"], {})
    with pytest.raises(ConfigError, match="two models are named"):
        make_slots(load_settings(["--model", "org1/m", "--model", "m=x/y"], {}))
    # An existing path containing "=" is a path, not NAME=PATH.
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert split_model_arg(str(odd)) == (None, str(odd))
    assert split_model_arg("n=~/m")[1] == os.path.expanduser("~/m")
