"""`/v1/responses` end to end: the real server (a scripted qwen3-family model that thinks, then
calls a tool, then answers once it sees the tool's result) and the official `openai` SDK's
`responses.create` / `responses.stream`, `previous_response_id` chains, retrieval, deletion,
input-token counting, forced custom tools under a grammar, and bad input as OpenAI's 4xx."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from mlx_server.testing import openapi
from mlx_server.testing.scripted import Script, build_scripted_model, write_scripts
from mlx_server.testing.server import ServerProcess, run_server

pytestmark = pytest.mark.slow

ANSWER = "It is sunny in Paris."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PATCH = "*** Begin Patch\nadd hello\n*** End Patch"
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": False,
    },
    {
        "type": "custom",
        "name": "apply_patch",
        "description": "Edit files",
        "format": {
            "type": "grammar",
            "syntax": "regex",
            "definition": r"\*\*\* Begin Patch\n[a-z ]+\n\*\*\* End Patch",
        },
    },
    {"type": "web_search"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("responses")
    model_dir = build_scripted_model(root / "qwen3", "qwen3")
    scripts = [
        Script(when="<tool_response>", text=f"<think>\nGot it.\n</think>\n\n{ANSWER}"),
        Script(when="PATCH", text=PATCH),
        Script(when="HELLO", text="<think>\nA greeting.\n</think>\n\nHello there!", chunk="char"),
        Script(text="<think>\nThe user wants the weather.\n</think>\n\n" + CALL, chunk="char"),
    ]
    script = write_scripts(root / "scripts.json", scripts)
    launcher = [sys.executable, "-m", "mlx_server.testing.scripted_server", "--script", str(script)]
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    with run_server(
        ["--model", str(model_dir), "--responses-store-bytes", "1M"],
        env=env,
        log_path=root / "server.log",
        launcher=launcher,
    ) as srv:
        yield srv


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_tool_loop_with_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="default",
        input="What is the weather in Paris?",
        instructions="You are helpful.",
        tools=TOOLS,
        include=["reasoning.encrypted_content"],
    )
    Response.model_validate(first.model_dump())
    assert first.status == "completed"
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"]
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and reasoning.content
    assert "weather" in reasoning.content[0].text and reasoning.encrypted_content
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert first.usage is not None and first.usage.input_tokens > 0
    second = client.responses.create(
        model="default",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=TOOLS,
    )
    assert second.output_text == ANSWER
    assert second.previous_response_id == first.id
    # The whole conversation was re-read; the prefix cache is off on scripted servers.
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens


def test_stream_events_in_order(client: openai.OpenAI) -> None:
    with client.responses.stream(model="default", input="HELLO", tools=TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Hello there!" == final.output_text
    thinking = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thinking.strip() == "A greeting."
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == [0, 1]


def test_streamed_tool_call(server: ServerProcess) -> None:
    body = {"model": "default", "input": "weather?", "tools": TOOLS, "stream": True}
    with httpx.stream(
        "POST", server.base_url + "/v1/responses", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        events = []
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                assert event["type"] == name
                events.append(event)
    adapter = __import__("pydantic").TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
        openapi.validate("openai.ResponseStreamEvent", event)  # strict: closed objects
    args = "".join(
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    )
    assert json.loads(args) == {"city": "Paris"}
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert json.loads(done[0]["arguments"]) == {"city": "Paris"}


def test_whole_bodies_meet_the_strict_contract(server: ServerProcess) -> None:
    for body in (
        {"input": "weather?", "tools": TOOLS},
        {
            "input": "PATCH it",
            "tools": TOOLS,
            "tool_choice": {"type": "custom", "name": "apply_patch"},
        },
        {"input": "HELLO", "max_output_tokens": 3},
    ):
        r = httpx.post(
            server.base_url + "/v1/responses", json={"model": "default", **body}, timeout=120
        )
        assert r.status_code == 200, r.text
        openapi.validate("openai.Response", r.json())


def test_forced_custom_tool_follows_its_grammar(client: openai.OpenAI) -> None:
    result = client.responses.create(
        model="default",
        input="PATCH the file",
        tools=TOOLS,
        tool_choice={"type": "custom", "name": "apply_patch"},
    )
    (item,) = [i for i in result.output if i.type == "custom_tool_call"]
    assert item.name == "apply_patch" and item.input == PATCH


def test_retrieve_delete_and_input_items(client: openai.OpenAI) -> None:
    made = client.responses.create(model="default", input="HELLO", metadata={"k": "v"})
    got = client.responses.retrieve(made.id)
    assert got.output_text == made.output_text and got.metadata == {"k": "v"}
    items = client.responses.input_items.list(made.id)
    assert [i.type for i in items.data] == ["message"]
    assert client.responses.delete(made.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    unstored = client.responses.create(model="default", input="HELLO", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_input_tokens_equal_usage(client: openai.OpenAI, server: ServerProcess) -> None:
    body = {"model": "default", "input": "HELLO", "instructions": "Be brief.", "tools": TOOLS}
    counted = httpx.post(server.base_url + "/v1/responses/input_tokens", json=body, timeout=60)
    assert counted.status_code == 200, counted.text
    assert counted.json()["object"] == "response.input_tokens"
    made = client.responses.create(**body)
    assert made.usage is not None
    assert counted.json()["input_tokens"] == made.usage.input_tokens


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": [{"type": "bogus"}]}, 400, "input[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"input": "x", "tools": [{"type": "teleport"}]}, 400, "tools[0].type"),
        (
            {
                "input": "x",
                "tools": [{"type": "web_search"}],
                "tool_choice": {"type": "web_search"},
            },
            400,
            "tool_choice",
        ),
        ({"input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"input": "x", "temperature": 3}, 400, "temperature"),
        ({"input": "x", "include": ["nonsense"]}, 400, "include"),
        ({"input": "x", "background": True}, 400, "background"),
        (
            {
                "input": "PATCH",
                "tools": [
                    {
                        "type": "custom",
                        "name": "p",
                        "format": {"type": "grammar", "syntax": "lark", "definition": "start: ((("},
                    }
                ],
                "tool_choice": {"type": "custom", "name": "p"},
            },
            400,
            "tool_choice",
        ),
    ],
)
def test_bad_requests(server: ServerProcess, body: dict[str, Any], status: int, param: str) -> None:
    r = httpx.post(server.base_url + "/v1/responses", json={"model": "default", **body}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_id_is_404_in_openai_shape(server: ServerProcess) -> None:
    for method in ("GET", "DELETE"):
        r = httpx.request(method, server.base_url + "/v1/responses/resp_nope", timeout=30)
        assert r.status_code == 404
        assert "resp_nope" in r.json()["error"]["message"]


def test_agents_sdk_default_model_tool_loop(server: ServerProcess) -> None:
    """The OpenAI Agents SDK's default model class (the Responses API) runs a whole tool loop:
    the model calls `get_weather`, the SDK runs it and sends the result back, the model
    answers."""
    import asyncio

    import agents

    agents.set_tracing_disabled(True)  # nothing may leave the machine
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def main() -> object:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key="unused", max_retries=0
        ) as client:
            model = agents.OpenAIResponsesModel(model="default", openai_client=client)
            agent = agents.Agent(
                name="weather", instructions="Help.", tools=[get_weather], model=model
            )
            result = await agents.Runner.run(agent, "What is the weather in Paris?")
            return result.final_output

    assert asyncio.run(main()) == ANSWER
    assert calls == ["Paris"]


def test_default_model_answers_over_responses(default_server: ServerProcess) -> None:
    """The real bundled model through the Responses API, streamed: a short greedy answer."""
    client = openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="x", max_retries=0)
    with client.responses.stream(
        model="default",
        input="What is the capital of France?",
        temperature=0,
        max_output_tokens=12,
    ) as stream:
        final = stream.get_final_response()
    assert "Paris" in final.output_text
    assert final.usage is not None and final.usage.output_tokens <= 12
