"""The exception tree. API layers turn these into OpenAI or Anthropic error shapes."""

from __future__ import annotations


class MlxServerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(MlxServerError):
    """A bad setting (flag, environment variable)."""


class ModelLoadError(MlxServerError):
    """The model could not be found, read or built."""


class RequestError(MlxServerError):
    """A request that cannot be served; carries what the HTTP layer needs to answer."""

    status: int = 400
    kind: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind


class InvalidRequest(RequestError):
    status = 400
    kind = "invalid_request_error"


class NotFound(RequestError):
    status = 404
    kind = "not_found_error"


class Overloaded(RequestError):
    status = 429
    kind = "overloaded_error"


class ServiceUnavailable(RequestError):
    status = 503
    kind = "api_error"


class RequestTimeout(RequestError):
    status = 504
    kind = "timeout_error"


class GenerationFailed(RequestError):
    """A generation that had started ended with an error (the stream's `Failed` event): its
    status and kind are the engine's, answered as they are."""

    status = 500
    kind = "api_error"
