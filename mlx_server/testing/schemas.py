"""Strict JSON Schemas of the response bodies the server promises, built from the typed models
that the official ``openai`` and ``anthropic`` packages ship.

Those models are generated from each vendor's own API description, so they name every field,
its type and (through ``Literal``) every enum value. They are written to *parse* responses
leniently, though: unknown keys are kept, and a field the API always sends but may set to null
is typed ``Optional[...] = None``, which makes it optional. Validating with them as they are
would miss a body that drops ``finish_reason`` or grows a stray key. So each contract here
takes the model's JSON Schema (pydantic's ``TypeAdapter(...).json_schema()``) and tightens it:

- every object that comes from a model is closed (``additionalProperties: false``); objects
  the API leaves open (``input``, ``metadata``: plain dicts in the models) stay open;
- the fields the API always sends, even as null, are required (``ALWAYS`` in each contract);
- fields this server adds on purpose (``reasoning_content``, ``timings``, the models'
  ``metadata``: each documented in the README) are declared, strictly, and nothing else is;
- a union tagged by ``type`` dispatches on it (an unknown ``type`` is one clear error instead
  of "matches none of 12 branches").

Every rule names the model it applies to; a rule whose model or field is gone (a new package
version renamed it) fails the build of the schema instead of silently loosening it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any, Literal

import anthropic.types as at
import attrs
import openai.types as ot
import openai.types.chat as oc
import openai.types.responses as otr
import openai.types.shared as os_
import pydantic

Schema = dict[str, Any]


# --------------------------------------------------------------------------- shapes of our own


class ModelList(pydantic.BaseModel):
    """``GET /v1/models``: the SDK pages it instead of naming it; this is its body."""

    object: Literal["list"]
    data: list[ot.Model]


class OpenAIErrorBody(pydantic.BaseModel):
    """An OpenAI error response: the SDK's error object under ``error``."""

    error: os_.ErrorObject


class PingEvent(pydantic.BaseModel):
    """Anthropic's keep-alive stream event (documented, but not modelled by the SDK)."""

    type: Literal["ping"]


AnthropicStreamEvent = (
    at.RawMessageStartEvent
    | at.RawContentBlockStartEvent
    | at.RawContentBlockDeltaEvent
    | at.RawContentBlockStopEvent
    | at.RawMessageDeltaEvent
    | at.RawMessageStopEvent
    | PingEvent
    | at.ErrorResponse
)


# --------------------------------------------------------------------------- the contracts


@attrs.frozen(kw_only=True)
class Contract:
    """One response shape: where its schema comes from and how it is tightened."""

    name: str  # "<vendor>.<Shape>", the name tests use
    source: Any  # a pydantic model class or any type pydantic's TypeAdapter takes
    aliases: tuple[str, ...] = ()  # the OpenAPI component names older call sites use
    # model title -> fields the API always sends (possibly as null): required here
    always: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    # model title -> field -> schema: fields this server adds on purpose
    extensions: Mapping[str, Mapping[str, Schema]] = attrs.field(factory=dict)


REASONING = {"reasoning_content": {"type": "string"}}  # the chain of thought, kept out of content


def _closed(properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    required = sorted(name for name in properties if name not in optional)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_MS = {"type": "number", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 0}
_RATE = {"type": ["number", "null"], "minimum": 0}
# `"timings": true` (README "Timings"): llama.cpp's names, on the response or the last chunk.
TIMINGS = {
    "timings": {
        "anyOf": [
            _closed(
                {
                    "prompt_n": _COUNT,
                    "prompt_ms": _MS,
                    "prompt_per_token_ms": _RATE,
                    "prompt_per_second": _RATE,
                    "predicted_n": _COUNT,
                    "predicted_ms": _MS,
                    "predicted_per_token_ms": _RATE,
                    "predicted_per_second": _RATE,
                    "cache_n": _COUNT,
                    "prompt_tokens": _COUNT,
                    "ttft_ms": _RATE,
                }
            ),
            {"type": "null"},
        ]
    }
}
# /v1/models (README "Model management"): each model's state beside the OpenAI fields.
MODEL_METADATA = {
    "metadata": _closed(
        {
            "state": {"enum": ["loaded", "loading", "available"]},
            "default": {"type": "boolean"},
            "aliases": {"type": "array", "items": {"type": "string"}},
            "size_bytes": _COUNT,
            "context_length": {"type": ["integer", "null"], "minimum": 1},
            "unload_in": _RATE,
            "load_error": {"type": "string"},
            "capabilities": {
                "type": "array",
                "items": {"enum": ["completion", "tools", "reasoning", "vision"]},
            },
            "model_type": {"type": ["string", "null"]},
            "quantization": {"type": ["string", "null"]},
            "tool_prompt": {"enum": ["template", "generic"]},
            "disk_bytes": _COUNT,
        },
        optional=(
            "load_error",
            "capabilities",
            "model_type",
            "quantization",
            "tool_prompt",
            "disk_bytes",
        ),
    )
}

# Responses: `store` is echoed as the API does, though the SDK's model does not name it.
RESPONSE_EXTRAS = {"store": {"type": "boolean"}}
ResponsesResponse = otr.Response
ResponsesStreamEvent = otr.ResponseStreamEvent

CHAT_LOGPROBS = {"ChoiceLogprobs": ("content", "refusal"), "TopLogprob": ("bytes",)}
CHAT_TOKEN_LOGPROB = {"ChatCompletionTokenLogprob": ("bytes",)}

CONTRACTS: tuple[Contract, ...] = (
    Contract(
        name="openai.ChatCompletion",
        source=oc.ChatCompletion,
        aliases=("CreateChatCompletionResponse",),
        always={
            "Choice": ("logprobs",),
            "ChatCompletionMessage": ("content", "refusal"),
            **CHAT_LOGPROBS,
            **CHAT_TOKEN_LOGPROB,
        },
        extensions={"ChatCompletion": TIMINGS, "ChatCompletionMessage": REASONING},
    ),
    Contract(
        name="openai.ChatCompletionChunk",
        source=oc.ChatCompletionChunk,
        aliases=("CreateChatCompletionStreamResponse",),
        always={"Choice": ("finish_reason",), **CHAT_LOGPROBS, **CHAT_TOKEN_LOGPROB},
        extensions={"ChatCompletionChunk": TIMINGS, "ChoiceDelta": REASONING},
    ),
    Contract(
        name="openai.Completion",
        source=ot.Completion,
        aliases=("CreateCompletionResponse",),
        always={"CompletionChoice": ("logprobs",)},
        extensions={"Completion": TIMINGS},
    ),
    Contract(
        name="openai.CreateEmbeddingResponse",
        source=ot.CreateEmbeddingResponse,
        aliases=("CreateEmbeddingResponse",),
    ),
    Contract(
        name="openai.Model",
        source=ot.Model,
        aliases=("Model",),
        extensions={"Model": MODEL_METADATA},
    ),
    Contract(
        name="openai.ModelList",
        source=ModelList,
        aliases=("ListModelsResponse",),
        extensions={"Model": MODEL_METADATA},
    ),
    Contract(
        name="openai.ErrorResponse",
        source=OpenAIErrorBody,
        aliases=("ErrorResponse",),
        always={"ErrorObject": ("param", "code")},
    ),
    Contract(
        name="openai.Response",
        source=ResponsesResponse,
        aliases=("Response",),
        always={"Response": ("error", "incomplete_details", "instructions", "usage")},
        extensions={"Response": RESPONSE_EXTRAS},
    ),
    Contract(
        name="openai.ResponseStreamEvent",
        source=ResponsesStreamEvent,
        aliases=("ResponseStreamEvent",),
        extensions={"Response": RESPONSE_EXTRAS},
    ),
    Contract(
        name="anthropic.Message",
        source=at.Message,
        aliases=("Message",),
        always={"Message": ("type", "stop_reason", "stop_sequence")},
    ),
    Contract(
        name="anthropic.MessageStreamEvent",
        source=AnthropicStreamEvent,
        aliases=("MessageStreamEvent",),
        always={
            "Message": ("type", "stop_reason", "stop_sequence"),
            "Delta": ("stop_reason", "stop_sequence"),
        },
    ),
    Contract(name="anthropic.ErrorResponse", source=at.ErrorResponse, aliases=("ErrorEvent",)),
    Contract(
        name="anthropic.MessageTokensCount",
        source=at.MessageTokensCount,
        aliases=("CountMessageTokensResponse",),
    ),
)

BY_NAME: dict[str, Contract] = {
    key: contract for contract in CONTRACTS for key in (contract.name, *contract.aliases)
}


class ContractError(RuntimeError):
    """A tightening rule no longer fits the installed SDK's models."""


# --------------------------------------------------------------------------- building


def _model_node(schema: Schema, title: str) -> Schema:
    """The object schema of the model called ``title`` (the root or one of ``$defs``)."""
    defs = schema.get("$defs", {})
    if title in defs:
        return defs[title]
    if schema.get("title") == title and "properties" in schema:
        return schema
    raise ContractError(f"no model {title!r} in the schema (models: {sorted(defs)})")


def _close(node: Any) -> None:
    """``additionalProperties: false`` on every object that lists its properties."""
    if isinstance(node, list):
        for item in node:
            _close(item)
        return
    if not isinstance(node, dict):
        return
    if "properties" in node and node.get("additionalProperties", True) is True:
        node["additionalProperties"] = False
    for value in node.values():
        _close(value)


def _tag_of(schema: Schema, branch: Any) -> str | None:
    """The constant ``type`` of a ``{"$ref": "#/$defs/X"}`` branch, if it has one."""
    if not isinstance(branch, dict) or set(branch) != {"$ref"}:
        return None
    ref = branch["$ref"]
    if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
        return None
    target = schema.get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
    tag = target.get("properties", {}).get("type", {}).get("const")
    return tag if isinstance(tag, str) else None


def _dispatch(schema: Schema, node: Any) -> Any:
    """Rewrite unions of models tagged by a constant ``type`` into a dispatch on ``type``."""
    if isinstance(node, list):
        return [_dispatch(schema, item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _dispatch(schema, value) for key, value in node.items()}
    for keyword in ("anyOf", "oneOf"):
        branches = out.get(keyword)
        if not isinstance(branches, list):
            continue
        nulls = [b for b in branches if b == {"type": "null"}]
        tagged = [b for b in branches if b not in nulls]
        tags = [_tag_of(schema, b) for b in tagged]
        if len(tagged) < 2 or None in tags or len(set(tags)) != len(tags):
            continue
        dispatch: Schema = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": tags}},
            "allOf": [
                {
                    "if": {"required": ["type"], "properties": {"type": {"const": tag}}},
                    "then": branch,
                }
                for tag, branch in zip(tags, tagged, strict=True)
            ],
        }
        del out[keyword]
        out.pop("discriminator", None)
        if nulls:
            out["anyOf"] = [dispatch, {"type": "null"}]
        else:
            out.setdefault("allOf", []).append(dispatch)
    return out


def _merge_null(node: Any) -> Any:
    """``anyOf: [{type: T, ...}, {type: null}]`` (pydantic's ``Optional``) becomes
    ``{type: [T, "null"], ...}``: the same rule, with an error message that names the type."""
    if isinstance(node, list):
        return [_merge_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _merge_null(value) for key, value in node.items()}
    branches = out.get("anyOf")
    if not isinstance(branches, list) or len(branches) != 2 or {"type": "null"} not in branches:
        return out
    [other] = [b for b in branches if b != {"type": "null"}]
    if not isinstance(other, dict) or not isinstance(other.get("type"), str):
        return out
    if {"anyOf", "oneOf", "allOf", "$ref"} & set(other):
        return out
    merged = {**other, "type": [other["type"], "null"]}
    if "const" in merged:
        merged["enum"] = [merged.pop("const")]
    if "enum" in merged:
        merged["enum"] = [*merged["enum"], None]
    del out["anyOf"]
    return {**out, **merged}


def build(contract: Contract) -> Schema:
    """The tightened JSON Schema (draft 2020-12) of one contract."""
    schema: Schema = pydantic.TypeAdapter(contract.source).json_schema(mode="validation")
    schema = copy.deepcopy(schema)
    for title, fields in contract.always.items():
        node = _model_node(schema, title)
        missing = [f for f in fields if f not in node["properties"]]
        if missing:
            raise ContractError(f"{contract.name}: {title} has no field(s) {missing}")
        node["required"] = sorted({*node.get("required", []), *fields})
    for title, extra in contract.extensions.items():
        node = _model_node(schema, title)
        clash = [f for f in extra if f in node["properties"]]
        if clash:
            raise ContractError(f"{contract.name}: {title} already has {clash}; drop the rule")
        node["properties"].update(copy.deepcopy(dict(extra)))
    _close(schema)
    return _merge_null(_dispatch(schema, schema))


@functools.cache
def schema_of(name: str) -> Schema:
    """The schema for a contract's name or one of its aliases (built once per process)."""
    try:
        contract = BY_NAME[name]
    except KeyError:
        raise KeyError(f"no response contract {name!r}; known: {sorted(BY_NAME)}") from None
    return build(contract)
