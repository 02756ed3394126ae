"""Error bodies in the shape of the API a route belongs to, and the handlers that make every
failure JSON (never quart's HTML pages).

OpenAI: `{"error": {"message", "type", "param", "code"}}`.
Anthropic (routes under /v1/messages): `{"type": "error", "error": {"type", "message"}}`.
Ollama (routes under /api/): `{"error": "message"}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from ..errors import GenerationFailed, RequestError

log = logging.getLogger(__name__)

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_KINDS = set(_ANTHROPIC_TYPES.values())


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def is_anthropic_request() -> bool:
    """Anthropic's routes, and the models routes when an Anthropic client asks (it sends
    `anthropic-version`)."""
    path = request.path
    if is_anthropic_path(path):
        return True
    models = path == "/v1/models" or path.startswith("/v1/models/")
    return models and "anthropic-version" in request.headers


def is_ollama_path(path: str) -> bool:
    """Ollama's API (`api/ollama`): errors are `{"error": "message"}`."""
    return path.startswith("/api/")


def openai_error_body(
    message: str,
    *,
    status: int,
    kind: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": kind or _OPENAI_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def anthropic_error_body(message: str, *, status: int, kind: str | None = None) -> dict[str, Any]:
    if kind not in _ANTHROPIC_KINDS:
        kind = _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
    return {"type": "error", "error": {"type": kind, "message": message}}


def _json_response(body: dict[str, Any], status: int, headers: dict[str, str] | None) -> Response:
    resp = Response(
        json.dumps(body, ensure_ascii=False), status=status, mimetype="application/json"
    )
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def openai_error(
    message: str,
    *,
    status: int,
    kind: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = openai_error_body(message, status=status, kind=kind, param=param, code=code)
    return _json_response(body, status, headers)


def anthropic_error(
    message: str, *, status: int, kind: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    return _json_response(anthropic_error_body(message, status=status, kind=kind), status, headers)


def error_response(
    message: str,
    *,
    status: int,
    kind: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error in the shape of the API the current request's route belongs to."""
    if is_ollama_path(request.path):
        return _json_response({"error": message}, status, headers)
    if is_anthropic_request():
        return anthropic_error(message, status=status, kind=kind, headers=headers)
    openai_kind = kind if kind in _OPENAI_TYPES.values() or kind is None else None
    if kind == "overloaded_error":
        openai_kind = None
    return openai_error(
        message, status=status, kind=openai_kind, param=param, code=code, headers=headers
    )


def error_from_exception(exc: RequestError) -> Response:
    if isinstance(exc, GenerationFailed):  # the engine's own status and kind, as they are
        if is_ollama_path(request.path):
            return _json_response({"error": exc.message}, exc.status, None)
        if is_anthropic_request():
            return anthropic_error(exc.message, status=exc.status, kind=exc.kind)
        return openai_error(exc.message, status=exc.status, kind=exc.kind)
    status = exc.status
    if exc.kind == "overloaded_error" and is_anthropic_request():
        status = 529  # Anthropic's "overloaded" status
    return error_response(exc.message, status=status, kind=exc.kind, param=exc.param, code=exc.code)


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(RequestError)
    async def _request_error(exc: RequestError) -> Response:
        return error_from_exception(exc)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 404:
            message = f"no route for {request.method} {request.path}"
            return error_response(message, status=404, code="not_found")
        if status == 405:
            message = f"method {request.method} is not allowed on {request.path}"
            allowed = exc.get_response().headers.get("Allow")
            headers = {"Allow": allowed} if allowed else None
            return error_response(message, status=405, code="method_not_allowed", headers=headers)
        if status == 413:
            return error_response("request body too large", status=413, code="request_too_large")
        return error_response(exc.description or exc.name, status=status)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(f"internal error: {type(exc).__name__}", status=500)
