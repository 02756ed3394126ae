#!/usr/bin/env python3
"""mlx-server through the official `anthropic` SDK: a streamed message, then a tool call.

    pip install anthropic
    python examples/anthropic_sdk.py [--url http://localhost:8000]

The base URL comes from --url, else MLX_SERVER_URL, else http://localhost:8000 (the SDK adds
/v1/messages itself). An API key from --api-key or MLX_SERVER_API_KEY; any string does when the
server has none.

The tool call is a whole agent loop: the server parses the model's call into a `tool_use` block
(`stop_reason` `tool_use`), the example runs the tool and sends a `tool_result`, and prints the
final answer. A model that answers in text instead (a small model never trained on tools) gets
its answer printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from anthropic import Anthropic

TOOLS: list[dict[str, Any]] = [
    {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]


def get_weather(city: str) -> str:
    return json.dumps({"city": city, "forecast": "sunny", "celsius": 21})


def streamed_message(client: Anthropic, model: str) -> None:
    print("== streamed message")
    with client.messages.stream(
        model=model,
        max_tokens=48,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    ) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)
        final = stream.get_final_message()
    print(f"\n[{final.usage.output_tokens} tokens, stop_reason {final.stop_reason}]")


def tool_call(client: Anthropic, model: str) -> None:
    print("== tool call")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = client.messages.create(
        model=model,
        max_tokens=64,
        tools=TOOLS,  # type: ignore[arg-type]
        messages=messages,  # type: ignore[arg-type]
    )
    calls = [block for block in response.content if block.type == "tool_use"]
    if not calls:
        text = "".join(block.text for block in response.content if block.type == "text")
        print(
            f"no tool_use block (stop_reason {response.stop_reason}): "
            f"the model answered in text: {text!r}"
        )
        return
    messages.append({"role": "assistant", "content": response.content})
    results = []
    for call in calls:
        print(f"the model calls {call.name}({call.input})")
        results.append(
            {
                "type": "tool_result",
                "tool_use_id": call.id,
                "content": get_weather(**call.input),  # type: ignore[arg-type]
            }
        )
    messages.append({"role": "user", "content": results})
    final = client.messages.create(
        model=model,
        max_tokens=64,
        tools=TOOLS,  # type: ignore[arg-type]
        messages=messages,  # type: ignore[arg-type]
    )
    print("".join(block.text for block in final.content if block.type == "text"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("MLX_SERVER_URL", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("MLX_SERVER_API_KEY") or "unused")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    base = args.url.rstrip("/").removesuffix("/v1")
    client = Anthropic(base_url=base, api_key=args.api_key, max_retries=0)
    streamed_message(client, args.model)
    tool_call(client, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
