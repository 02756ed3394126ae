#!/usr/bin/env python3
"""A terminal chat with mlx-server: multi-turn, tokens shown as they arrive.

    python examples/chat.py [--url http://localhost:8000] [--system "Be brief."]

Type a message and press Enter. Ctrl-C while an answer streams stops it: the client closes the
stream, so the server stops generating it, and you can type the next message (the partial
answer stays in the conversation). Ctrl-C or Ctrl-D at the prompt quits; so does /quit. /reset
starts a new conversation.

Only the standard library is used. The base URL comes from --url, else MLX_SERVER_URL, else
http://localhost:8000; an API key from --api-key or MLX_SERVER_API_KEY (sent as a bearer token).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit


class ServerError(Exception):
    pass


def stream_chat(
    url: str, payload: dict[str, object], api_key: str | None, timeout: float = 600
) -> Iterator[str]:
    """POST a streamed chat completion; yield the text of each delta as it arrives. Closing the
    generator (or an exception such as KeyboardInterrupt while it waits) closes the
    connection, which tells the server to stop generating."""
    parts = urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = connection_class(parts.hostname or "localhost", parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = parts.path.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
    try:
        conn.request("POST", path, body=json.dumps(payload), headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            body = response.read().decode("utf-8", errors="replace")
            try:
                message = json.loads(body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = body[:200]
            raise ServerError(f"HTTP {response.status}: {message}")
        for raw in response:  # one SSE line at a time, as the server sends them
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue  # blank separators and ": keepalive" comments
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(chunk["error"].get("message", "error"))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("MLX_SERVER_URL", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("MLX_SERVER_API_KEY"))
    parser.add_argument("--model", default="default", help="model name (default: the served one)")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None)
    args = parser.parse_args()
    # Ctrl-C means "stop this answer", even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if interactive:
        print(f"chatting with {args.url} (Ctrl-C stops an answer; /reset, /quit)")

    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not interactive and not line:
            return 0  # end of piped input
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            messages = messages[:1] if args.system else []
            print("(new conversation)", flush=True)
            continue

        messages.append({"role": "user", "content": text})
        payload: dict[str, object] = {
            "model": args.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "stream": True,
        }
        if args.temperature is not None:
            payload["temperature"] = args.temperature
        print("assistant> ", end="", flush=True)
        answer: list[str] = []
        try:
            for piece in stream_chat(args.url, payload, args.api_key):
                answer.append(piece)
                print(piece, end="", flush=True)
            print(flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", flush=True)
        except (ServerError, OSError) as exc:
            print(f"\n[error: {exc}]", flush=True)
            messages.pop()  # forget the turn that failed
            continue
        messages.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    sys.exit(main())
