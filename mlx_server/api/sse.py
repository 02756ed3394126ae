"""Server-sent events framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

KEEPALIVE = b": keepalive\n\n"
DONE = b"data: [DONE]\n\n"


def data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def event(name: str, obj: Any) -> bytes:
    payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class ClosingBody:
    """A response body that releases its request when the response ends, even if the body
    was never iterated (the client left before the first byte): quart always calls aclose."""

    def __init__(self, gen: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self._gen = gen
        self._on_close = on_close

    def __aiter__(self) -> ClosingBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()  # type: ignore[attr-defined]
        finally:
            self._on_close()
