"""End to end: Ollama's API (`/api/*`) through a real server process and the official `ollama`
Python client.

The server runs a scripted model (`mlx_server.testing.scripted`: a tiny model with a Qwen3-style
template whose network emits a script chosen by the prompt), so answers, thinking and tool
calls are known in advance; it requires an API key, which the client sends as a bearer token.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest

from mlx_server.testing.scripted import Script, build_scripted_model, write_scripts
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

KEY = "ollama-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = "Hello from the scripted model."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
CALL += "</tool_call>"
ANSWER = "It is sunny in Paris."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
SCRIPTS = [
    Script(when="<tool_response>", text=ANSWER),
    Script(when="WEATHER", text=CALL, chunk="char"),
    Script(when="PONDER", text="<think>\nTwo and two.\n</think>\n\nFour.", chunk="char"),
    Script(text=HELLO, chunk="char"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ollama")
    model_dir = build_scripted_model(root / "scripted-qwen3", "qwen3")
    script = write_scripts(root / "scripts.json", SCRIPTS)
    launcher = [sys.executable, "-m", "mlx_server.testing.scripted_server", "--script", str(script)]
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    args = ["--model", str(model_dir), "--api-key", KEY]
    with run_server(args, env=env, log_path=root / "server.log", launcher=launcher) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.base_url, headers=AUTH, timeout=120) as c:
        yield c


MODEL = "scripted-qwen3"
pytestmark = pytest.mark.slow


def test_version_tags_show_ps(client: ollama.Client, server: ServerProcess) -> None:
    version = httpx.get(f"{server.base_url}/api/version", headers=AUTH).json()
    assert isinstance(version["version"], str) and version["version"].count(".") == 2

    (tag,) = client.list().models
    assert tag.model == MODEL and tag.size and tag.size > 0 and tag.digest
    assert tag.details is not None and tag.details.family == "llama"
    assert tag.details.format == "safetensors"

    shown = client.show(MODEL)
    assert shown.capabilities is not None and "tools" in shown.capabilities
    assert "thinking" in shown.capabilities  # the template has <think>
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 4096
    assert client.show(f"{MODEL}:latest").details == shown.details  # Ollama's default tag

    (running,) = client.ps().models
    assert running.model == MODEL and running.context_length == 4096
    assert running.expires_at is not None and running.expires_at.year > 9000  # never unloaded


def test_chat_whole_and_streamed(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat(model=MODEL, messages=messages, stream=False)
    assert whole.message.role == "assistant" and whole.message.content == HELLO
    assert whole.done and whole.done_reason == "stop" and whole.model == MODEL
    assert whole.prompt_eval_count and whole.prompt_eval_count > 5
    assert whole.eval_count == len(HELLO) + 1  # one token per character, then the end token
    assert whole.total_duration and whole.eval_duration is not None
    assert whole.prompt_eval_duration is not None
    assert whole.total_duration >= whole.prompt_eval_duration + whole.eval_duration * 0.99
    assert whole.created_at and whole.created_at.endswith("Z")

    parts = list(client.chat(model=MODEL, messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == HELLO
    assert len(parts) > 5 and not any(p.done for p in parts[:-1])
    last = parts[-1]
    assert last.done and last.done_reason == "stop" and last.eval_count == whole.eval_count
    assert last.prompt_eval_count == whole.prompt_eval_count


def test_chat_thinking_and_options(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "PONDER: two and two?"}]
    whole = client.chat(model=MODEL, messages=messages, stream=False, think=True)
    assert whole.message.thinking == "Two and two." and whole.message.content == "Four."
    parts = list(client.chat(model=MODEL, messages=messages, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts).strip() == "Two and two."
    assert "".join(p.message.content or "" for p in parts) == "Four."

    capped = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        options={"num_predict": 3, "temperature": 0, "stop": ["zzz"], "num_ctx": 2048},
    )
    assert capped.done_reason == "length" and capped.eval_count == 3
    assert capped.message.content == HELLO[:3]

    # More stop strings than OpenAI's four.
    stopped = client.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        options={"stop": ["zzz", "yyy", "xxx", "www", " scripted"]},
    )
    assert stopped.message.content == "Hello from the" and stopped.done_reason == "stop"


def test_tool_call_round_trip(client: ollama.Client) -> None:
    messages: list[Any] = [{"role": "user", "content": "WEATHER in Paris?"}]
    first = client.chat(model=MODEL, messages=messages, tools=TOOLS, stream=False)
    (call,) = first.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris", "days": 2}
    assert first.done_reason == "stop"

    streamed = list(client.chat(model=MODEL, messages=messages, tools=TOOLS, stream=True))
    calls = [c for p in streamed for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2})
    ]

    messages += [first.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    final = client.chat(model=MODEL, messages=messages, tools=TOOLS, stream=False)
    assert final.message.content == ANSWER and not final.message.tool_calls


def test_generate_templated_raw_and_streamed(client: ollama.Client) -> None:
    out = client.generate(model=MODEL, prompt="Say hello.", system="Be kind.")
    assert out.response == HELLO and out.done and out.done_reason == "stop"
    assert out.eval_count == len(HELLO) + 1

    parts = list(client.generate(model=MODEL, prompt="Say hello.", stream=True))
    assert "".join(p.response or "" for p in parts) == HELLO and parts[-1].done

    # raw: the prompt as is, no template (the scripted model answers any prompt).
    raw = client.generate(model=MODEL, prompt="PONDER", raw=True, options={"num_predict": 6})
    assert raw.response == "<think"  # raw: the text as generated, no reasoning split
    assert raw.eval_count == 6 and raw.done_reason == "length"
    assert raw.prompt_eval_count is not None and raw.prompt_eval_count < 5  # no template added


def test_load_and_unload_with_an_empty_request(client: ollama.Client) -> None:
    unloaded = client.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert client.ps().models == []
    loaded = client.chat(model=MODEL, messages=[])
    assert loaded.done and loaded.done_reason == "load"
    assert [m.model for m in client.ps().models] == [MODEL]


@pytest.fixture(scope="module")
def tiny_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ollama.Client]:
    """A plain tiny random-weight model (the scripted one has no hidden states to pool)."""
    root = tmp_path_factory.mktemp("ollama-tiny")
    build_tiny_model(root / "tiny-llama")
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    args = ["--model", str(root / "tiny-llama")]
    with run_server(args, env=env, log_path=root / "server.log") as srv:
        with ollama.Client(host=srv.base_url, timeout=120) as c:
            yield c


def test_embed(tiny_client: ollama.Client) -> None:
    client, MODEL = tiny_client, "tiny-llama"
    out = client.embed(model=MODEL, input=["first text", "second"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 64  # the hidden size
    assert out.prompt_eval_count and out.prompt_eval_count >= 3
    one = client.embed(model=MODEL, input="first text", dimensions=8)
    assert len(one.embeddings[0]) == 8
    legacy = client.embeddings(model=MODEL, prompt="first text")
    assert legacy.embedding == pytest.approx(out.embeddings[0], abs=1e-4)


def test_errors_in_ollamas_shape(client: ollama.Client, server: ServerProcess) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "no-such-model" in missing.value.error
    with pytest.raises(ollama.ResponseError) as unknown_show:
        client.show("no-such-model")
    assert unknown_show.value.status_code == 404

    url = f"{server.base_url}/api/chat"
    bad = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "'model'"),
        (json.dumps({"model": MODEL, "messages": [{"role": "wizard"}]}).encode(), "role"),
        (json.dumps({"model": MODEL, "messages": "hi"}).encode(), "'messages'"),
        (json.dumps({"model": MODEL, "stream": "yes", "messages": []}).encode(), "'stream'"),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "format": "xml"}
            ).encode(),
            "'format'",
        ),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "keep_alive": "x"}
            ).encode(),
            "keep_alive",
        ),
    ]
    for body, needle in bad:
        r = httpx.post(url, content=body, headers=AUTH)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"].startswith("application/json")
        error = r.json()
        assert list(error) == ["error"] and needle in error["error"], (body, error)

    over = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"top_p": 7}}
    )
    r = httpx.post(url, content=over, headers=AUTH)
    assert r.status_code == 400 and "top_p" in r.json()["error"]

    no_route = httpx.get(f"{server.base_url}/api/nothing-here", headers=AUTH)
    assert no_route.status_code == 404 and list(no_route.json()) == ["error"]


def test_same_api_key_as_every_route(server: ServerProcess) -> None:
    for method, path in [("GET", "/api/tags"), ("POST", "/api/chat"), ("GET", "/api/version")]:
        r = httpx.request(method, f"{server.base_url}{path}", json={"model": MODEL})
        assert r.status_code == 401 and "API key" in r.json()["error"], r.text
    wrong = ollama.Client(host=server.base_url, headers={"Authorization": "Bearer wrong"})
    with wrong, pytest.raises(ollama.ResponseError) as denied:
        wrong.list()
    assert denied.value.status_code == 401


def test_streams_are_ndjson(server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{server.base_url}/api/chat", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(line["done"] is False for line in lines[:-1])
    assert {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration"} <= set(
        lines[-1]
    )
