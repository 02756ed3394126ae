"""What every dialect's protocol models share: the strict base model, the field types the
dialects reuse, and reading a request body into a model with each field error turned into a 400
whose `param` is the field's path (`messages[1].content`).

Models are strict (a string is not a number, `1` is not `true`) so the OpenAPI document generated
from them says exactly what the handlers accept; unknown fields are ignored, as the APIs do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field
from pydantic_core import ErrorDetails
from quart import request

from ..errors import InvalidRequest

M = TypeVar("M", bound="Model")


class Model(pydantic.BaseModel):
    """A request model. `param_roots`: fields whose errors name the field itself rather than
    a path inside it (what the APIs have always reported for union-shaped fields)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    param_roots: ClassVar[frozenset[str]] = frozenset()
    root_messages: ClassVar[Mapping[str, str]] = {}  # a param root's one message


class Part(pydantic.BaseModel):
    """A nested object of a request (a message, a content block, a tool)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def _integral(value: Any) -> Any:
    """`5.0` is the integer 5 (JSON has one number type); `5.5` stays a float and fails."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]
Number = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, json_schema_extra={"x-token-id": True}), INTEGRAL]


def _stop(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


MAX_STOP = 4
# OpenAI: up to 4 stop sequences, one string or a list.
_StopList = Annotated[list[str], Field(max_length=MAX_STOP)]
Stop = Annotated[
    _StopList | None,
    BeforeValidator(_stop, json_schema_input_type=str | _StopList | None),  # pyright: ignore[reportOperatorIssue]
]


# -- reading a body ----------------------------------------------------------------------------


async def parse(model: type[M]) -> M:
    """The current request's JSON body as `model`; a 400 naming the bad field otherwise."""
    ctype = request.headers.get("content-type", "")
    raw = await request.get_data(as_text=False)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    if ctype and "json" not in ctype and "text/plain" not in ctype:
        raise InvalidRequest(f"unsupported content type {ctype!r}; send application/json")
    return parse_bytes(model, raw)


def parse_bytes(model: type[M], raw: bytes | str) -> M:
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise _as_request_error(model, exc, raw) from None


def parse_object(model: type[M], body: Mapping[str, Any]) -> M:
    """For a dialect that builds another dialect's body (the Responses API's chat body)."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise _as_request_error(model, exc, body) from None


def _as_request_error(
    model: type[Model], exc: pydantic.ValidationError, raw: bytes | str | Mapping[str, Any]
) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON: {first['msg']}")
    if not first["loc"] and first["type"] in ("model_type", "model_attributes_type"):
        return InvalidRequest("the request body must be a JSON object")
    if isinstance(raw, bytes | str):
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
    else:
        body = raw
    # A union reports one error per member; the one that got furthest into the body says most.
    located = [(field_path(e["loc"], body), e) for e in errors]
    param, error = max(located, key=lambda pe: (len(pe[0]), pe[1]["type"] not in _KINDS))
    same = [e for p, e in located if p == param]
    # Union-shaped fields name the field itself as `param`; the message keeps the whole path.
    root = param.split(".", 1)[0].split("[", 1)[0]
    named = root if root in model.param_roots else param
    if root in model.root_messages:
        return InvalidRequest(model.root_messages[root], param=root)
    if len(same) > 1 and all(e["type"] in _KINDS for e in same):
        kinds = " or ".join(dict.fromkeys(_KINDS[e["type"]] for e in same))
        return InvalidRequest(f"'{param}' must be {kinds}", param=named)
    return InvalidRequest(describe(param, error, len(errors)), param=named or None)


def field_path(loc: tuple[int | str, ...], body: Any) -> str:
    """`('messages', 1, 'str', 'content')` -> `messages[1].content`, walking the body beside the
    location so that the names of union members and tags in it are left out."""
    out = ""
    node = body
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and (part in node or last):
            out += f".{part}" if out else part
            node = node.get(part)
        elif isinstance(part, str) and part.isidentifier() and node is None and last:
            out += f".{part}" if out else part
    return out


_KINDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "finite_number": "a finite number",
}


def describe(param: str, error: ErrorDetails, count: int = 1) -> str:
    """A field error in the house style: `'temperature' must be at most 2, got 5`."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    name = f"'{param}'" if param else "the request body"
    if kind in _KINDS:
        text = f"{name} must be {_KINDS[kind]}"
    elif kind == "missing":
        text = f"{name} is required"
    elif kind in ("less_than_equal", "less_than"):
        text = f"{name} must be at most {ctx.get('le', ctx.get('lt'))}, got {value!r}"
    elif kind in ("greater_than_equal", "greater_than"):
        text = f"{name} must be at least {ctx.get('ge', ctx.get('gt'))}, got {value!r}"
    elif kind == "literal_error":
        text = f"{name} must be one of {ctx.get('expected')}, got {value!r}"
    elif kind == "union_tag_invalid":
        text = (
            f"{name}: type {ctx.get('tag')!r} must be one of {ctx.get('expected_tags')}"
            " (unknown or unsupported type)"
        )
    elif kind == "union_tag_not_found":
        text = f"{name} must be an object with a 'type'"
    elif kind == "too_short":
        text = f"{name} must not be empty" if ctx.get("min_length") == 1 else error["msg"]
        if ctx.get("min_length") != 1:
            text = f"{name} takes at least {ctx.get('min_length')} items"
    elif kind == "too_long":
        text = f"{name} takes at most {ctx.get('max_length')} items"
    elif kind == "string_too_short":
        text = f"{name} must not be empty"
    elif kind == "string_pattern_mismatch":
        text = f"{name} must match {ctx.get('pattern')}"
    elif kind == "value_error":
        text = f"{name}: {ctx.get('error', error['msg'])!s}"
    else:
        text = f"{name}: {error['msg']}"
    if isinstance(value, float) and not math.isfinite(value) and "got" not in text:
        text += f", got {value!r}"
    return text if count == 1 else f"{text} (and {count - 1} more errors)"


class Response(pydantic.BaseModel):
    """A response shape, for the OpenAPI document (renderers write plain dicts of this shape;
    the fuzz tests check every answer against it). A field with a default may be absent."""

    model_config = ConfigDict(frozen=True)
