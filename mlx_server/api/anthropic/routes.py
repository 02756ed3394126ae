"""Anthropic's routes: Messages (streamed or whole) and token counting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from quart import Blueprint, Response

from ...errors import InvalidRequest
from ...generation import count_tokens as prompt_tokens
from ...generation.prepare import ContextTooLong
from .. import outcome
from ..protocol import parse
from ..run import model_for, run
from . import convert
from .protocol import CountTokensRequest, MessagesRequest
from .render import MessageRender

bp = Blueprint("anthropic", __name__)


@bp.after_request
async def _request_id(response: Response) -> Response:
    """Anthropic answers every request with a `request-id` header (the SDK exposes it): the
    same id as `x-request-id` and the access log's."""
    if "request-id" not in response.headers:
        response.headers["request-id"] = outcome.current().request_id
    return response


@bp.post("/v1/messages")
async def create_message() -> Response | dict[str, Any]:
    body = await parse(MessagesRequest)
    with _anthropic_wording():
        return await run(convert.messages_request(body), MessageRender())


@bp.post("/v1/messages/count_tokens")
async def count_tokens() -> dict[str, Any]:
    """The prompt `/v1/messages` would read, counted the same way (`generation.prepare`)."""
    request = convert.messages_request(await parse(CountTokensRequest))
    return {"input_tokens": await prompt_tokens(await model_for(request), request)}


@contextlib.contextmanager
def _anthropic_wording() -> Iterator[None]:
    """A prompt over the context in the words Anthropic uses (clients such as Claude Code
    recognise them and compact the conversation)."""
    try:
        yield
    except ContextTooLong as exc:
        message = f"prompt is too long: {exc.tokens} tokens > {exc.limit} maximum"
        raise InvalidRequest(message, param=exc.param, code=exc.code) from None
