"""OpenAI's Responses API: create (streamed or whole), retrieve, delete, list input items, and
count input tokens. parse -> convert (into the chat shape, then the one internal request) ->
run -> render; stored responses live in a byte-bounded LRU (`store.py`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
from quart import Blueprint, Quart, Response, current_app

from ...config import Settings
from ...errors import InvalidRequest
from ...generation import Request
from ...generation import count_tokens as prompt_tokens
from ...messages import ConstraintSpec
from ..openai import convert as chat_convert
from ..openai.protocol import ChatCompletionRequest
from ..protocol import parse, parse_object
from ..run import model_for, run
from .convert import ChatShape, encrypt_reasoning, to_chat
from .events import ResponseWriter, new_id
from .protocol import InputTokensRequest, ResponsesRequest
from .render import ResponsesRender
from .store import ResponseStore, StoredResponse

log = logging.getLogger(__name__)
bp = Blueprint("responses", __name__)
STORE_KEY = "mlx_server.responses"
INCLUDABLE = frozenset(
    {
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
        "message.input_image.image_url",
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
    }
)


def install(app: Quart, settings: Settings) -> None:
    app.extensions[STORE_KEY] = ResponseStore(max_bytes=settings.responses_store_bytes)
    app.register_blueprint(bp)


def _store() -> ResponseStore:
    return current_app.extensions[STORE_KEY]


def _not_found(response_id: str) -> InvalidRequest:
    return InvalidRequest(f"Response with id '{response_id}' not found.", status=404)


# -- conversion -------------------------------------------------------------------------------


def _input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return list(body.input)


def _history(body: ResponsesRequest) -> list[dict[str, Any]]:
    if body.previous_response_id is None:
        return []
    record = _store().get(body.previous_response_id)
    if record is None:
        raise InvalidRequest(
            f"Previous response with id '{body.previous_response_id}' not found.",
            param="previous_response_id",
            status=404,
        )
    return record.history()


def _chat_body(body: ResponsesRequest, shape: ChatShape, messages: list[dict[str, Any]]) -> dict:
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": bool(body.stream)}
    if shape.tools:
        chat["tools"] = shape.tools
        if shape.tool_choice is not None:
            chat["tool_choice"] = shape.tool_choice
        if body.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = body.parallel_tool_calls
    if shape.response_format is not None:
        chat["response_format"] = shape.response_format
    for key, value in (
        ("max_completion_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
    ):
        if value is not None:
            chat[key] = value
    if body.reasoning is not None and body.reasoning.effort is not None:
        chat["reasoning_effort"] = body.reasoning.effort
    return chat


def _forced_custom(body: ResponsesRequest, shape: ChatShape) -> tuple[str, ConstraintSpec] | None:
    """A `tool_choice` that forces a custom tool with a grammar: the whole generation follows
    that grammar and becomes the call's input."""
    choice = shape.tool_choice
    if not isinstance(choice, dict):
        return None
    name = choice["function"]["name"]
    fmt = shape.custom_grammars.get(name)
    if fmt is None:
        return None
    if fmt["syntax"] == "regex":
        return name, ConstraintSpec.regex(fmt["definition"])
    return name, ConstraintSpec.lark(fmt["definition"])


def _convert(
    body: ResponsesRequest, history: list[dict[str, Any]], *, stream: bool
) -> tuple[Request, ChatShape, str | None]:
    if body.background:
        raise InvalidRequest("background responses are not supported", param="background")
    unknown = [i for i in body.include or [] if i not in INCLUDABLE]
    if unknown:
        raise InvalidRequest(f"'include' has unknown values {unknown}", param="include")
    shape = to_chat(body.model_dump(by_alias=True), history)
    if shape.skipped_tools:
        log.info(
            "responses: built-in tools %s are not offered to the model (this server cannot "
            "run them)",
            ", ".join(shape.skipped_tools),
        )
    chat = _chat_body(body, shape, shape.messages)
    forced = _forced_custom(body, shape)
    if forced is not None:
        chat["tool_choice"] = "auto"  # the grammar below, not a tool grammar, forces the call
    chat["stream"] = stream
    request = chat_convert.chat_request(parse_object(ChatCompletionRequest, chat))
    request = attrs.evolve(request, id=new_id("resp"))
    if forced is not None:
        request = attrs.evolve(request, constraint=forced[1], constraint_param="tool_choice")
    return request, shape, forced[0] if forced is not None else None


async def _truncated(body: ResponsesRequest, request: Request) -> Request:
    """`truncation: auto`: drop the oldest turns (never the system prompt or the newest
    turn) until the prompt leaves room for output in the context."""
    if body.truncation != "auto" or request.chat is None:
        return request
    model = await model_for(request)
    chat = list(request.chat)
    while await prompt_tokens(model, attrs.evolve(request, chat=tuple(chat))) >= (
        model.context_length
    ):
        first = next((i for i, m in enumerate(chat) if m.role != "system"), None)
        if first is None or first >= len(chat) - 1:
            break  # nothing left to drop: the context check reports it
        del chat[first]
        while first < len(chat) - 1 and chat[first].role == "tool":
            del chat[first]  # results whose call is gone
    return attrs.evolve(request, chat=tuple(chat))


def _base(body: ResponsesRequest) -> dict[str, Any]:
    """The request-derived fields of the response object."""
    text = body.text.model_dump(exclude_none=True) if body.text is not None else {}
    text.setdefault("format", {"type": "text"})
    return {
        "model": body.model,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "prompt_cache_key": body.prompt_cache_key,
        "reasoning": body.reasoning.model_dump() if body.reasoning is not None else None,
        "store": body.store is not False,
        "temperature": body.temperature,
        "text": text,
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": body.truncation or "disabled",
        "user": body.user,
        "background": False,
    }


# -- routes -----------------------------------------------------------------------------------


@bp.post("/v1/responses")
async def create_response() -> Response | dict[str, Any]:
    body = await parse(ResponsesRequest)
    history = _history(body)
    request, shape, custom = _convert(body, history, stream=bool(body.stream))
    request = await _truncated(body, request)
    conversation = [*history, *_input_items(body)]
    store = _store()

    def keep(response: dict[str, Any]) -> None:
        if body.store is not False and response.get("status") != "failed":
            if not store.put(response["id"], StoredResponse.of(response, conversation)):
                log.warning("responses: %s is larger than the store; not kept", response["id"])

    include = set(body.include or [])
    writer = ResponseWriter(
        response_id=request.id,
        base=_base(body),
        tools=shape.tool_map,
        created_at=int(time.time()),
        encrypt=encrypt_reasoning if "reasoning.encrypted_content" in include else None,
    )
    return await run(request, ResponsesRender(writer=writer, on_done=keep, custom_call=custom))


@bp.get("/v1/responses/<response_id>")
async def get_response(response_id: str) -> dict[str, Any]:
    record = _store().get(response_id)
    if record is None:
        raise _not_found(response_id)
    return record.response


@bp.delete("/v1/responses/<response_id>")
async def delete_response(response_id: str) -> dict[str, Any]:
    if not _store().delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@bp.get("/v1/responses/<response_id>/input_items")
async def list_input_items(response_id: str) -> dict[str, Any]:
    record = _store().get(response_id)
    if record is None:
        raise _not_found(response_id)
    items = []
    for i, item in enumerate(record.conversation):
        shown = dict(item)
        shown.setdefault("type", "message")
        shown.setdefault("id", f"item_{response_id}_{i}")
        items.append(shown)
    items.reverse()  # newest first, as the API lists them by default
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }


@bp.post("/v1/responses/input_tokens")
async def input_tokens() -> dict[str, Any]:
    """The prompt `/v1/responses` would read, counted the same way (`generation.prepare`)."""
    body = await parse(InputTokensRequest)
    request, _, _ = _convert(body, _history(body), stream=False)
    request = await _truncated(body, request)
    count = await prompt_tokens(await model_for(request), request)
    return {"object": "response.input_tokens", "input_tokens": count}
