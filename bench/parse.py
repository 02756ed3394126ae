"""Parse + validate cost of one request body, and the error messages a bad one gets.

Compares, on the same bytes:

- `pydantic`: the server's own protocol model (`api.openai.protocol.ChatCompletionRequest`),
  `model_validate_json` straight from the body bytes (what `api.protocol.parse` does);
- `pydantic (dict)`: `json.loads` first, then `model_validate` (for dialects that build a body);
- `json.loads`: decoding alone, the floor under any validation written by hand in Python;
- `msgspec` and `attrs+cattrs`: equivalent models of the same request (only when the package is
  importable: `uv run --with msgspec --with cattrs python -m bench.parse`).

Two bodies: a typical chat request (about 1 KB) and an agent request of about 200 KB (30 tools
with JSON Schemas, 120 turns of tool calls and results: about 30k tokens). Then the error each
library gives for a few bad bodies, and the server's own 400 for them (`param` and message).

    uv run python -m bench.parse
    uv run --with msgspec --with cattrs python -m bench.parse --repeat 300
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from mlx_server.api.openai.protocol import ChatCompletionRequest
from mlx_server.api.protocol import parse_bytes
from mlx_server.errors import InvalidRequest


def typical() -> dict[str, Any]:
    return {
        "model": "default",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": "What is the capital of France? " * 8},
        ],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n\n"],
    }


def agent(target_bytes: int = 200_000) -> dict[str, Any]:
    """Tools with real-looking schemas and a long history of calls and results."""
    tools = []
    for t in range(30):
        props = {
            f"arg_{k}": {
                "type": "string",
                "description": f"Argument {k} of tool {t}: what it means and how it is used.",
            }
            for k in range(8)
        }
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": f"tool_{t}",
                    "description": f"Tool number {t}. " + "It does something useful. " * 6,
                    "parameters": {"type": "object", "properties": props, "required": ["arg_0"]},
                },
            }
        )
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a coding agent. " * 40},
        {"role": "user", "content": "Fix the failing test in the repository. " * 10},
    ]
    i = 0
    while len(json.dumps({"tools": tools, "messages": messages})) < target_bytes:
        call_id = f"call_{i:04d}"
        messages.append(
            {
                "role": "assistant",
                "content": "Let me look at the file.",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": f"tool_{i % 30}",
                            "arguments": json.dumps({"arg_0": f"src/module_{i}.py", "arg_1": "x"}),
                        },
                    }
                ],
            }
        )
        messages.append(
            {"role": "tool", "tool_call_id": call_id, "content": "def f(x):\n    return x\n" * 40}
        )
        i += 1
    return {
        "model": "default",
        "messages": messages,
        "tools": tools,
        "tool_choice": "auto",
        "temperature": 0.2,
        "max_completion_tokens": 4096,
        "stream": True,
    }


BAD = {
    "temperature 5": {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
    "bad role": {"messages": [{"role": "robot", "content": "hi"}]},
    "tool call name": {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]},
        ]
    },
    "max_tokens string": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
}


# -- the alternatives (only when installed) -------------------------------------------------


def msgspec_parser() -> Callable[[bytes], Any] | None:
    try:
        import msgspec
    except ImportError:
        return None
    from typing import Annotated, Literal

    M = msgspec.Meta

    class Function(msgspec.Struct):
        name: str
        arguments: str | dict[str, Any] = "{}"

    class ToolCall(msgspec.Struct):
        function: Function
        id: str | None = None
        type: Literal["function"] = "function"

    class Message(msgspec.Struct):
        role: Literal["system", "developer", "user", "assistant", "tool", "function"]
        content: str | list[dict[str, Any]] | None = None
        name: str | None = None
        tool_calls: list[ToolCall] | None = None
        tool_call_id: str | None = None

    class FunctionDef(msgspec.Struct):
        name: Annotated[str, M(min_length=1)]
        description: str | None = None
        parameters: dict[str, Any] | None = None

    class Tool(msgspec.Struct):
        function: FunctionDef
        type: Literal["function"] = "function"

    class StreamOptions(msgspec.Struct):
        include_usage: bool | None = None

    class Chat(msgspec.Struct):
        messages: Annotated[list[Message], M(min_length=1)]
        model: str | None = None
        temperature: Annotated[float, M(ge=0, le=2)] | None = None
        top_p: Annotated[float, M(ge=0, le=1)] | None = None
        max_tokens: Annotated[int, M(ge=1)] | None = None
        max_completion_tokens: Annotated[int, M(ge=1)] | None = None
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        stop: str | Annotated[list[str], M(max_length=4)] | None = None
        tools: list[Tool] | None = None
        tool_choice: str | dict[str, Any] | None = None

    decoder = msgspec.json.Decoder(Chat)
    return decoder.decode


def cattrs_parser() -> Callable[[bytes], Any] | None:
    try:
        import cattrs
    except ImportError:
        return None
    import attrs

    def check(lo: float, hi: float) -> Callable[[Any, Any, Any], None]:
        def validate(_inst: Any, attr: Any, value: Any) -> None:
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"{attr.name} must be in [{lo}, {hi}]")

        return validate

    @attrs.frozen
    class Function:
        name: str
        arguments: str = "{}"  # cattrs needs a hook for str | dict unions

    @attrs.frozen
    class ToolCall:
        function: Function
        id: str | None = None
        type: str = "function"

    @attrs.frozen
    class Message:
        role: str = attrs.field(
            validator=attrs.validators.in_(
                ("system", "developer", "user", "assistant", "tool", "function")
            )
        )
        content: str | None = None
        name: str | None = None
        tool_calls: list[ToolCall] | None = None
        tool_call_id: str | None = None

    @attrs.frozen
    class FunctionDef:
        name: str
        description: str | None = None
        parameters: dict[str, Any] | None = None

    @attrs.frozen
    class Tool:
        function: FunctionDef
        type: str = "function"

    @attrs.frozen
    class Chat:
        messages: list[Message]
        model: str | None = None
        temperature: float | None = attrs.field(default=None, validator=check(0, 2))
        top_p: float | None = attrs.field(default=None, validator=check(0, 1))
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        stream: bool | None = None
        stop: list[str] | None = None
        tools: list[Tool] | None = None
        tool_choice: str | None = None

    converter = cattrs.Converter(forbid_extra_keys=False)

    def parse(raw: bytes) -> Any:
        body = json.loads(raw)
        body.pop("stream_options", None)
        return converter.structure(body, Chat)

    return parse


def server_parse(raw: bytes) -> Any:
    return parse_bytes(ChatCompletionRequest, raw)


def timed(fn: Callable[[bytes], Any], raw: bytes, repeat: int) -> float:
    """Median microseconds per call."""
    fn(raw)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(raw)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=200, help="timed calls per case")
    args = ap.parse_args()
    parsers: dict[str, Callable[[bytes], Any] | None] = {
        "pydantic": server_parse,
        "pydantic (dict)": lambda raw: ChatCompletionRequest.model_validate(json.loads(raw)),
        "json.loads": json.loads,
        "msgspec": msgspec_parser(),
        "attrs+cattrs": cattrs_parser(),
    }
    bodies = {"typical": json.dumps(typical()).encode(), "agent": json.dumps(agent()).encode()}
    print(
        f"{'parser':<18}"
        + "".join(f"{k} ({len(v) / 1000:.0f} KB)".rjust(22) for k, v in bodies.items())
    )
    for name, fn in parsers.items():
        if fn is None:
            print(f"{name:<18}{'(not installed)':>22}")
            continue
        cells = [f"{timed(fn, raw, args.repeat):>19.1f} us" for raw in bodies.values()]
        print(f"{name:<18}" + "".join(cells))
    print("\nerrors for bad bodies:")
    for label, body in BAD.items():
        raw = json.dumps(body).encode()
        print(f"- {label}:")
        try:
            server_parse(raw)
        except InvalidRequest as exc:
            print(f"    server:   400 param={exc.param!r} {exc.message}")
        for name in ("msgspec", "attrs+cattrs"):
            fn = parsers[name]
            if fn is None:
                continue
            try:
                fn(raw)
                print(f"    {name}: accepted")
            except Exception as exc:  # each library's own error type
                text = str(exc).replace("\n", " | ")[:150]
                print(f"    {name}: {type(exc).__name__}: {text}")


if __name__ == "__main__":
    main()
