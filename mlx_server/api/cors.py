"""CORS for browser clients, off unless `--cors-origins` names the allowed origins.

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed
  origin is answered here (200, empty) with the `Access-Control-Allow-*` headers, before access
  control, so it needs no API key (browsers never send credentials on a preflight).
- The allowed origin may send any request header it asks for: the OpenAI and Anthropic SDKs send
  several of their own (`x-stainless-*`, `anthropic-dangerous-direct-browser-access`, ...) besides
  `Authorization`, `Content-Type`, `x-api-key` and `anthropic-version`, and a fixed list would
  break them one release at a time. The origin itself is the operator's decision.
- Every other response to an allowed origin (errors and streams included) carries
  `Access-Control-Allow-Origin`, so the page can read error bodies, plus the headers it may read.
- A disallowed origin gets no CORS headers at all; its browser then blocks the response.

With `*` the answer is `Access-Control-Allow-Origin: *`; otherwise the request's own origin is
echoed with `Vary: Origin`. Credentials (cookies) are never allowed: API keys travel in headers.
"""

from __future__ import annotations

from collections.abc import Iterable

from quart import Quart, Response, request

ALLOWED_METHODS = "GET, POST, OPTIONS"
DEFAULT_HEADERS = "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta"
EXPOSED_HEADERS = "Retry-After, request-id, x-request-id"
MAX_AGE_SECONDS = 600


class CorsPolicy:
    def __init__(self, origins: Iterable[str]) -> None:
        cleaned = {o.strip().rstrip("/").lower() for o in origins if o.strip()}
        self.any = "*" in cleaned
        self.origins = frozenset(cleaned - {"*"})

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for a request from `origin`, or None."""
        if not origin:
            return None
        if self.any:
            return "*"
        return origin if origin.rstrip("/").lower() in self.origins else None

    def preflight(self, allowed: str, requested_headers: str | None) -> Response:
        response = Response("", status=200, content_type="text/plain")
        h = response.headers
        h["Access-Control-Allow-Origin"] = allowed
        h["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        h["Access-Control-Allow-Headers"] = requested_headers or DEFAULT_HEADERS
        h["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
        if not self.any:
            h["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        return response


def install_cors(app: Quart, origins: Iterable[str]) -> None:
    """Install the CORS hooks; nothing at all when `origins` is empty. Call it before anything
    that could refuse a preflight (access control)."""
    policy = CorsPolicy(origins)
    if not policy.any and not policy.origins:
        return

    @app.before_request
    async def _preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        allowed = policy.allow_origin(request.headers.get("Origin"))
        if allowed is None:
            return None  # quart's plain OPTIONS answer, without CORS headers
        return policy.preflight(allowed, request.headers.get("Access-Control-Request-Headers"))

    @app.after_request
    async def _headers(response: Response) -> Response:
        allowed = policy.allow_origin(request.headers.get("Origin"))
        if allowed is not None and "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            if not policy.any:
                response.headers.add("Vary", "Origin")
        return response
