#!/usr/bin/env python3
"""mlx-server through the official `openai` SDK: a streamed chat, then a tool call.

    pip install openai
    python examples/openai_sdk.py [--url http://localhost:8000]

The base URL comes from --url, else MLX_SERVER_URL, else http://localhost:8000 (the SDK wants it
with /v1). An API key from --api-key or MLX_SERVER_API_KEY; the SDK insists on one, so any
string does when the server has none.

The tool call is a whole agent loop: the server parses the call out of the model's output (in
its family's markup: Hermes/Qwen, Qwen3-Coder XML, Llama 3 JSON, Mistral), the example runs the
tool, sends the result and prints the final reply. A model that answers in text instead (a small
model that was never trained on tools) gets its answer printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import openai
from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str) -> str:
    return json.dumps({"city": city, "forecast": "sunny", "celsius": 21})


def streamed_chat(client: OpenAI, model: str) -> None:
    print("== streamed chat")
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[{chunk.usage.completion_tokens} tokens]")


def tool_call(client: OpenAI, model: str) -> None:
    print("== tool call")
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    try:
        response = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            max_tokens=64,
        )
    except openai.BadRequestError as exc:
        error = exc.body if isinstance(exc.body, dict) else {}
        print(
            f"the server refused the tools (HTTP {exc.status_code}, param "
            f"{error.get('param')!r}): {error.get('message', exc.message)}"
        )
        return
    message = response.choices[0].message
    if not message.tool_calls:
        print(f"no tool call; the model answered: {message.content}")
        return
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        if call.type != "function":
            continue
        args = json.loads(call.function.arguments or "{}")
        print(f"the model calls {call.function.name}({args})")
        result = get_weather(**args)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=64,
    )
    print(final.choices[0].message.content)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("MLX_SERVER_URL", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("MLX_SERVER_API_KEY") or "unused")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    base = args.url.rstrip("/").removesuffix("/v1") + "/v1"
    client = OpenAI(base_url=base, api_key=args.api_key, max_retries=0)
    model = client.models.list().data[0].id  # the served model's name
    print(f"model: {model}")
    streamed_chat(client, args.model)
    tool_call(client, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
