"""Error bodies in OpenAI's shape, and the handlers that make every failure JSON."""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

from ..errors import RequestError

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
    resp = Response(_dumps(body), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def error_from_exception(exc: RequestError) -> Response:
    kind = exc.kind if exc.kind != "not_found_error" or exc.status != 404 else None
    return openai_error(exc.message, status=exc.status, kind=kind, param=exc.param, code=exc.code)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(RequestError)
    async def _request_error(exc: RequestError) -> Response:
        return error_from_exception(exc)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 404:
            from quart import request

            message = f"no route for {request.method} {request.path}"
            return openai_error(message, status=404, code="not_found")
        if status == 405:
            from quart import request

            message = f"method {request.method} is not allowed on {request.path}"
            resp = openai_error(message, status=405, code="method_not_allowed")
            allowed = (
                exc.get_response().headers.get("Allow") if hasattr(exc, "get_response") else None
            )
            if allowed:
                resp.headers["Allow"] = allowed
            return resp
        if status == 413:
            return openai_error("request body too large", status=413, code="request_too_large")
        return openai_error(exc.description or exc.name, status=status)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return openai_error(f"internal error: {type(exc).__name__}", status=500)
