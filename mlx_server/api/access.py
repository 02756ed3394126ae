"""Access control for the API routes (/v1, Ollama's /api) and /admin: the API key (`--api-key`)
and the per-client rate limit (`--rate-limit` requests per minute). `/health` stays open."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable

from quart import Quart, Response, request

from ..config import Settings
from .errors import error_response
from .metrics import mark_rejected

# The API routes (OpenAI and Anthropic under /v1, Ollama's under /api) and the admin routes.
GUARDED_PREFIXES = ("/v1/", "/api/", "/admin/")


def presented_key() -> str | None:
    """The key a client sent: `Authorization: Bearer KEY` (OpenAI) or `x-api-key` (Anthropic)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


class RateLimiter:
    """A token bucket per client: `per_minute` requests per minute, bursts up to the same."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last time)

    def take(self, client: str) -> float:
        """Consume one request for `client`; return 0 if allowed, else seconds to wait."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:
                self._forget_full(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        for client, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.capacity:
                del self._buckets[client]


def install_access_control(app: Quart, settings: Settings) -> None:
    expected = settings.api_key.encode() if settings.api_key else None
    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit > 0 else None
    if expected is None and limiter is None:
        return

    @app.before_request
    async def _guard() -> Response | None:
        if not request.path.startswith(GUARDED_PREFIXES) or request.method == "OPTIONS":
            return None
        key = presented_key()
        if expected is not None:
            if key is None:
                return error_response(
                    "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                    status=401,
                    kind="authentication_error",
                    code="invalid_api_key",
                )
            if not hmac.compare_digest(key.encode(), expected):
                return error_response(
                    "invalid API key",
                    status=401,
                    kind="authentication_error",
                    code="invalid_api_key",
                )
        if limiter is not None:
            client = f"key:{key}" if key else f"addr:{request.remote_addr}"
            wait = limiter.take(client)
            if wait > 0:
                mark_rejected("rate_limit")  # a 429 that is not the queue being full
                return error_response(
                    f"rate limit of {settings.rate_limit} requests per minute exceeded",
                    status=429,
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return None
