"""A small HTTP/1.1 client on trio and h11 (both already server dependencies), for replay.

One connection per request (`Connection: close`), response bodies read as they arrive, so
stream timings are what the network delivered. `https://` works through `trio.SSLStream`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import attrs
import h11
import trio

USER_AGENT = "mlx-server-replay"
_READ_SIZE = 65536


class HTTPError(Exception):
    """The request could not be made or its response could not be read."""


@attrs.frozen
class BaseURL:
    scheme: str
    host: str
    port: int
    prefix: str  # a path prefix ("" or "/proxy"), never ending in "/"

    @classmethod
    def parse(cls, url: str) -> BaseURL:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        prefix = parts.path.rstrip("/")
        if prefix.endswith("/v1"):  # trace endpoints carry /v1 themselves
            prefix = prefix[:-3]
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, prefix)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.prefix}"


@attrs.define(eq=False)
class Response:
    status: int
    headers: list[tuple[str, str]]
    _stream: trio.abc.Stream
    _conn: h11.Connection

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as it arrives."""
        while True:
            event = await _next_event(self._conn, self._stream)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event | type:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HTTPError(f"bad response: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, OSError) as exc:
            raise HTTPError(f"connection lost: {exc}") from None
        conn.receive_data(bytes(data))


@asynccontextmanager
async def open_request(
    base: BaseURL,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> AsyncIterator[Response]:
    """Send one request; yield its response once the status line and headers are in. Leaving
    the block closes the connection (a server stops generating for a closed stream)."""
    try:
        tcp = await trio.open_tcp_stream(base.host, base.port)
    except OSError as exc:
        raise HTTPError(f"cannot connect to {base}: {exc.strerror or exc}") from None
    stream: trio.abc.Stream = tcp
    try:
        if base.scheme == "https":
            ssl_stream = trio.SSLStream(
                tcp, ssl.create_default_context(), server_hostname=base.host
            )
            try:
                await ssl_stream.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                raise HTTPError(f"TLS handshake with {base} failed: {exc}") from None
            stream = ssl_stream
        conn = h11.Connection(h11.CLIENT)
        all_headers = [
            ("host", base.host_header),
            ("user-agent", USER_AGENT),
            ("connection", "close"),
            *headers,
        ]
        if body or method in ("POST", "PUT", "PATCH"):
            all_headers.append(("content-length", str(len(body))))
        request = h11.Request(method=method, target=base.prefix + target, headers=all_headers)
        try:
            data = conn.send(request) or b""
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as exc:
            raise HTTPError(f"sending failed: {exc}") from None
        while True:
            event = await _next_event(conn, stream)
            if isinstance(event, h11.Response):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise HTTPError("the server closed the connection without answering")
        response_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        yield Response(event.status_code, response_headers, stream, conn)
    finally:
        await trio.aclose_forcefully(stream)
