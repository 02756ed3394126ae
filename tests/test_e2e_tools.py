"""End to end: tool calling and reasoning through real server processes.

A small model will not call tools on its own, so each family is served by a scripted model
(`mlx_server.testing.scripted`): a tiny model directory with the family's chat template whose
network is replaced by one that emits a script chosen by the prompt. The scripts are emitted
one character per token, so every tool call reaches the parser in the smallest pieces.
Responses go through raw HTTP (OpenAI bodies checked against the OpenAPI description) and the
`openai` / `anthropic` SDKs (agent loops: a tool call, its result, the final answer).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from mlx_server.testing import openapi, streams
from mlx_server.testing.scripted import Script, build_scripted_model, write_scripts
from mlx_server.testing.server import ServerProcess, run_server

pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(120.0, connect=10.0)
ARGS = {"city": "Paris", "days": 2}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA},
    }
]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}]
ANSWER = "It is sunny in Paris."

CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
    "</tool_call>",
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
}
# How each template shows a tool result to the model: then the script gives the answer.
RESULT_SEEN = {
    "hermes": "<tool_response>",
    "qwen3": "<tool_response>",
    "qwen3_coder": "<tool_response>",
    "llama3": r"ipython<\|end_header_id\|>",
    "mistral": r"\[TOOL_RESULTS\]",
}
PREAMBLE = {"hermes": "Let me check.\n", "qwen3_coder": "Let me check.\n"}  # text before a call
FAMILIES = list(CALLS)


def scripts_for(family: str) -> list[Script]:
    if family == "qwen3_thinking":  # the template opens <think>: the output starts inside it
        return [Script(text="Deep thought.\n</think>\n\nDone.", chunk="char")]
    if family == "qwen3":
        call = CALLS["hermes"]
        thought = "<think>\nThe user wants the weather.\n</think>\n\n"
        return [
            Script(when=RESULT_SEEN[family], text=f"<think>\nGot it.\n</think>\n\n{ANSWER}"),
            Script(
                when="REASON",
                text="<think>\nTwo plus two.\n</think>\n\nThe answer is 4.",
                chunk="char",
            ),
            Script(text=thought + call, chunk="char"),
        ]
    call = CALLS[family]
    forced = CALLS[family].replace("Paris", "Rome").replace(', "days": 2', "")
    forced = forced.replace("<parameter=days>\n2\n</parameter>\n", "")
    if family in ("hermes", "llama3", "mistral"):  # a grammar's JSON is compact
        forced = forced.replace(": ", ":").replace(", ", ",")
    return [
        Script(when=RESULT_SEEN[family], text=ANSWER, chunk="char"),
        Script(when="MALFORMED", text='<tool_call>{"name": oops}</tool_call>'),
        Script(when="FORCED", text=forced),
        Script(when="TWO", text=call + "\n" + call.replace("Paris", "Lyon")),
        Script(text=PREAMBLE.get(family, "") + call, chunk="char"),
    ]


def _scripted_server(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp(f"scripted-{family}")
    model_dir = build_scripted_model(root / family, family)
    script = write_scripts(root / "scripts.json", scripts_for(family))
    launcher = [sys.executable, "-m", "mlx_server.testing.scripted_server", "--script", str(script)]
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    with run_server(
        ["--model", str(model_dir)], env=env, log_path=root / "server.log", launcher=launcher
    ) as server:
        yield server


@pytest.fixture(scope="module", params=FAMILIES)
def family_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerProcess]]:
    family = request.param
    for server in _scripted_server(family, tmp_path_factory):
        yield family, server


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _scripted_server("hermes", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from _scripted_server("qwen3", tmp_path_factory)


def user(text: str = "What is the weather in Paris?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat(server: ServerProcess, **body: Any) -> dict[str, Any]:
    body.setdefault("messages", user())
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    data = r.json()
    openapi.validate("CreateChatCompletionResponse", data)
    return data


def chat_stream(server: ServerProcess, **body: Any) -> list[dict[str, Any]]:
    body.setdefault("messages", user())
    chunks = []
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/chat/completions",
        json={**body, "stream": True},
        timeout=TIMEOUT,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    streams.check_chat_stream(chunks, include_usage=bool(body.get("stream_options")))
    return chunks


def messages(server: ServerProcess, **body: Any) -> dict[str, Any]:
    body = {"model": "default", "max_tokens": 300, "messages": user(), **body}
    r = httpx.post(f"{server.base_url}/v1/messages", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    openapi.validate("anthropic.Message", r.json())
    return r.json()


def messages_stream(server: ServerProcess, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    body = {"model": "default", "max_tokens": 300, "messages": user(), **body, "stream": True}
    out: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("POST", f"{server.base_url}/v1/messages", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[len("data: ") :])))
    streams.check_anthropic_stream([payload for _, payload in out])
    return out


# -- every family, both APIs, streamed and not --------------------------------------------------


def test_openai_tool_call(family_server: tuple[str, ServerProcess]) -> None:
    family, server = family_server
    data = chat(server, tools=OPENAI_TOOLS)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] == (PREAMBLE.get(family, "").strip() or None)
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGS


def test_openai_tool_call_streamed(family_server: tuple[str, ServerProcess]) -> None:
    family, server = family_server
    chunks = chat_stream(server, tools=OPENAI_TOOLS)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content.strip() == PREAMBLE.get(family, "").strip()
    assert "<" not in content and "{" not in content and "[" not in content  # no markup leaks
    parts = [tc for d in deltas for tc in d.get("tool_calls") or []]
    first = parts[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    arguments = "".join(p["function"].get("arguments", "") for p in parts)
    assert json.loads(arguments) == ARGS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_tool_use(family_server: tuple[str, ServerProcess]) -> None:
    family, server = family_server
    data = messages(server, tools=ANTHROPIC_TOOLS)
    assert data["stop_reason"] == "tool_use"
    blocks = data["content"]
    tool_use = blocks[-1]
    assert tool_use["type"] == "tool_use" and tool_use["id"].startswith("toolu_")
    assert tool_use["name"] == "get_weather" and tool_use["input"] == ARGS
    if family in PREAMBLE:
        assert blocks[0] == {"type": "text", "text": PREAMBLE[family].strip()}


def test_anthropic_tool_use_streamed(family_server: tuple[str, ServerProcess]) -> None:
    _, server = family_server
    events = messages_stream(server, tools=ANTHROPIC_TOOLS)
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    starts = [d for k, d in events if k == "content_block_start"]
    stops = [d for k, d in events if k == "content_block_stop"]
    assert [s["index"] for s in starts] == [s["index"] for s in stops]  # every block stopped
    tool = next(s for s in starts if s["content_block"]["type"] == "tool_use")
    assert tool["content_block"]["name"] == "get_weather"
    assert tool["content_block"]["id"].startswith("toolu_")
    partial = "".join(
        d["delta"]["partial_json"]
        for k, d in events
        if k == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    )
    assert json.loads(partial) == ARGS
    texts = "".join(
        d["delta"]["text"]
        for k, d in events
        if k == "content_block_delta" and d["delta"]["type"] == "text_delta"
    )
    assert "<" not in texts and "{" not in texts
    [delta] = [d for k, d in events if k == "message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 10


def test_agent_loops(family_server: tuple[str, ServerProcess]) -> None:
    """The openai and anthropic SDKs: call, run the tool, send the result, get the answer."""
    _, server = family_server
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
        history: list[Any] = user()
        first = client.chat.completions.create(
            model="default",
            messages=history,
            tools=OPENAI_TOOLS,  # type: ignore[arg-type]
        )
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert first.choices[0].finish_reason == "tool_calls"
        history.append(first.choices[0].message.model_dump(exclude_none=True))
        history.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"})
        final = client.chat.completions.create(
            model="default",
            messages=history,
            tools=OPENAI_TOOLS,  # type: ignore[arg-type]
        )
        assert final.choices[0].message.content == ANSWER
        assert final.choices[0].finish_reason == "stop"
    with anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0) as claude:
        turns: list[Any] = user()
        reply = claude.messages.create(
            model="default",
            max_tokens=300,
            messages=turns,
            tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
        )
        assert reply.stop_reason == "tool_use"
        tool_use = next(b for b in reply.content if b.type == "tool_use")
        turns.append({"role": "assistant", "content": reply.content})
        turns.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny, 24 C"}
                ],
            }
        )
        with claude.messages.stream(
            model="default",
            max_tokens=300,
            messages=turns,
            tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
        ) as stream:
            final_message = stream.get_final_message()
        assert final_message.stop_reason == "end_turn"
        assert [b.type for b in final_message.content] == ["text"]
        assert final_message.content[0].text == ANSWER  # type: ignore[union-attr]


# -- choices, parallel calls, malformed output, errors (Hermes) ------------------------------


def test_forced_tool_choice(family_server: tuple[str, ServerProcess]) -> None:
    """A named function (OpenAI) and "any" tool (Anthropic): a grammar for the JSON families,
    a prefilled call for the others; the scripted model goes on from the prefill."""
    _, server = family_server
    forced = {"type": "function", "function": {"name": "get_weather"}}
    data = chat(server, messages=user("FORCED"), tools=OPENAI_TOOLS, tool_choice=forced)
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    [call] = data["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    data = messages(
        server, messages=user("FORCED"), tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"}
    )
    assert data["stop_reason"] == "tool_use"
    assert data["content"][-1]["input"] == {"city": "Rome"}


def test_parallel_calls(hermes: ServerProcess) -> None:
    data = chat(hermes, messages=user("TWO"), tools=OPENAI_TOOLS)
    calls = data["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Lyon"]
    assert len({c["id"] for c in calls}) == 2
    data = chat(hermes, messages=user("TWO"), tools=OPENAI_TOOLS, parallel_tool_calls=False)
    assert len(data["choices"][0]["message"]["tool_calls"]) == 1
    data = messages(
        hermes,
        messages=user("TWO"),
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert [b["type"] for b in data["content"]] == ["tool_use"]


def test_malformed_call_is_text(hermes: ServerProcess) -> None:
    data = chat(hermes, messages=user("MALFORMED"), tools=OPENAI_TOOLS)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == '<tool_call>{"name": oops}</tool_call>'


def test_tool_choice_none_parses_nothing(hermes: ServerProcess) -> None:
    data = chat(hermes, tools=OPENAI_TOOLS, tool_choice="none")
    message = data["choices"][0]["message"]
    assert "tool_calls" not in message and "<tool_call>" in message["content"]


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [{"type": "function", "function": {"name": ""}}]},
        {"tools": "nope"},
        {"tools": OPENAI_TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
        {"tools": OPENAI_TOOLS, "tool_choice": "sometimes"},
        {"tool_choice": "required"},
        {"tools": OPENAI_TOOLS, "parallel_tool_calls": "yes"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{bad"},
                        }
                    ],
                },
            ]
        },
    ],
)
def test_openai_bad_tools_are_400(hermes: ServerProcess, body: dict[str, Any]) -> None:
    body.setdefault("messages", user())
    r = httpx.post(f"{hermes.base_url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    openapi.validate("ErrorResponse", r.json())


@pytest.mark.parametrize(
    "body",
    [
        {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
        {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "whatever"}},
        {"tool_choice": {"type": "any"}},
        {"thinking": {"type": "enabled"}},
        {"thinking": "yes"},
    ],
)
def test_anthropic_bad_tools_are_400(hermes: ServerProcess, body: dict[str, Any]) -> None:
    body = {"model": "default", "max_tokens": 10, "messages": user(), **body}
    r = httpx.post(f"{hermes.base_url}/v1/messages", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    openapi.validate("anthropic.ErrorResponse", r.json())
    assert r.json()["type"] == "error"


def test_tool_results_render_through_the_template(hermes: ServerProcess) -> None:
    """count_tokens sees tool_use / tool_result blocks as template turns (a tool_result with
    block content and is_error included), the same prompt /v1/messages generates from."""
    turns = [
        *user(),
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": ARGS}
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "is_error": True,
                    "content": [{"type": "text", "text": "service down"}],
                }
            ],
        },
    ]
    body = {"model": "default", "messages": turns, "tools": ANTHROPIC_TOOLS}
    r = httpx.post(f"{hermes.base_url}/v1/messages/count_tokens", json=body, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    data = messages(hermes, messages=turns, tools=ANTHROPIC_TOOLS)
    assert data["usage"]["input_tokens"] == r.json()["input_tokens"]
    assert data["content"] == [{"type": "text", "text": ANSWER}]  # the script saw the result


# -- reasoning (Qwen3-style) -----------------------------------------------------------------


def test_openai_reasoning(qwen3: ServerProcess) -> None:
    message = chat(qwen3, messages=user("REASON"))["choices"][0]["message"]
    assert message["reasoning_content"] == "Two plus two."
    assert message["content"] == "The answer is 4."
    deltas = [
        c["choices"][0]["delta"]
        for c in chat_stream(qwen3, messages=user("REASON"))
        if c["choices"]
    ]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Two plus two."
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 4."


def test_openai_reasoning_then_tool_call(qwen3: ServerProcess) -> None:
    message = chat(qwen3, tools=OPENAI_TOOLS)["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == ARGS


def test_anthropic_thinking(qwen3: ServerProcess) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    data = messages(qwen3, messages=user("REASON"), thinking=thinking)
    assert [b["type"] for b in data["content"]] == ["thinking", "text"]
    assert data["content"][0]["thinking"] == "Two plus two." and data["content"][0]["signature"]
    assert data["content"][1]["text"] == "The answer is 4."
    # Thinking not enabled: the reasoning is dropped.
    data = messages(qwen3, messages=user("REASON"))
    assert data["content"] == [{"type": "text", "text": "The answer is 4."}]
    with anthropic.Anthropic(base_url=qwen3.base_url, api_key="x", max_retries=0) as claude:
        with claude.messages.stream(
            model="default",
            max_tokens=300,
            messages=user("REASON"),  # type: ignore[arg-type]
            thinking=thinking,  # type: ignore[arg-type]
        ) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Two plus two."  # type: ignore[union-attr]
    assert final.content[0].signature  # type: ignore[union-attr]
    assert final.content[1].text == "The answer is 4."  # type: ignore[union-attr]


def test_reasoning_opened_by_the_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    for server in _scripted_server("qwen3_thinking", tmp_path_factory):
        message = chat(server)["choices"][0]["message"]
        assert message["reasoning_content"] == "Deep thought."
        assert message["content"] == "Done."
        thinking = {"type": "enabled", "budget_tokens": 1024}
        blocks = messages(server, thinking=thinking)["content"]
        assert [b["type"] for b in blocks] == ["thinking", "text"]
        assert blocks[0]["thinking"] == "Deep thought." and blocks[1]["text"] == "Done."


def test_concurrent_rows_follow_their_own_scripts(qwen3: ServerProcess) -> None:
    """Several requests batched together: each row's script is its own."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(
                chat, qwen3, messages=user("REASON" if i % 2 else "weather"), tools=OPENAI_TOOLS
            )
            for i in range(4)
        ]
        results = [f.result()["choices"][0] for f in futures]
    for i, choice in enumerate(results):
        if i % 2:
            assert choice["message"]["content"] == "The answer is 4."
        else:
            assert choice["finish_reason"] == "tool_calls"


# -- the real default model ------------------------------------------------------------------


def test_default_model_with_tools(default_server: ServerProcess) -> None:
    """The real model with tools, tool calls and tool results in its history: valid shapes
    (it answers with text or a call; it is not trained to call tools)."""
    history = [
        *user(),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(ARGS)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    for body in ({"messages": user()}, {"messages": history}):
        data = chat(default_server, tools=OPENAI_TOOLS, max_tokens=4, temperature=0, **body)
        message = data["choices"][0]["message"]
        assert isinstance(message["content"], str) or message["tool_calls"]
    turns = [
        *user(),
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": ARGS}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    data = messages(
        default_server, messages=turns, tools=ANTHROPIC_TOOLS, max_tokens=4, temperature=0
    )
    assert data["content"] and data["content"][0]["type"] in ("text", "tool_use")
