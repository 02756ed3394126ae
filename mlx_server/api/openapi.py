"""The OpenAPI 3.1 document at `GET /openapi.json` (open, no key), generated from the protocol
models: request and response schemas come from `api/openai/protocol.py` and
`api/anthropic/protocol.py` (the same models that validate requests), so the document cannot
drift from what the handlers check. Written here by hand: the paths, the SSE event envelopes,
the error responses and security.

- What depends on the running server is filled in per request: the served model names and
  aliases (`model` matches exactly those, case-insensitively), the vocabulary (token ids), and
  whether `--api-key` is set. While the model loads these are left open.
- Streams (`"stream": true`) are `text/event-stream`. As OpenAPI 3.1 has it, the stream's schema
  describes one event, `{"event": name, "data": text}`; `data` is JSON described with
  `contentMediaType`/`contentSchema` (OpenAI streams end with the literal `[DONE]`).
- Errors: OpenAI's `{"error": {...}}` on OpenAI routes, Anthropic's `{"type": "error", "error":
  {...}}` on `/v1/messages*`, with every status a route can answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any, Literal

from pydantic.json_schema import models_json_schema
from quart import Quart

from ..config import Settings
from .admin import openapi as admin_doc
from .anthropic import protocol as anthropic
from .ollama import openapi as ollama_doc
from .openai import protocol as openai
from .openapi_parts import ModelTable, Schema, ref
from .protocol import Response
from .responses import protocol as responses
from .state import state

OPENAPI_VERSION = "3.1.0"
DOCUMENT_PATH = "/openapi.json"
REF = "#/components/schemas/{model}"


class Health(Response):
    status: Literal["loading", "ok", "failed", "stopping"]
    reason: str | None = None
    model: str | None = None
    running: int | None = None
    waiting: int | None = None
    models: list[dict[str, Any]] | None = None
    model_memory: dict[str, int] | None = None


# name in the document -> (model, mode)
MODELS: ModelTable = {
    "ChatCompletionRequest": (openai.ChatCompletionRequest, "validation"),
    "CompletionRequest": (openai.CompletionRequest, "validation"),
    "EmbeddingRequest": (openai.EmbeddingRequest, "validation"),
    "MessagesRequest": (anthropic.MessagesRequest, "validation"),
    "CountTokensRequest": (anthropic.CountTokensRequest, "validation"),
    "ChatCompletion": (openai.ChatCompletion, "serialization"),
    "ChatCompletionChunk": (openai.ChatCompletionChunk, "serialization"),
    "Completion": (openai.Completion, "serialization"),
    "Embeddings": (openai.Embeddings, "serialization"),
    "Model": (openai.ModelCard, "serialization"),
    "ModelList": (openai.ModelList, "serialization"),
    "OpenAIError": (openai.OpenAIError, "serialization"),
    "AnthropicMessage": (anthropic.AnthropicMessage, "serialization"),
    "AnthropicTokenCount": (anthropic.TokenCount, "serialization"),
    "AnthropicError": (anthropic.AnthropicError, "serialization"),
    "Health": (Health, "serialization"),
    "ResponsesRequest": (responses.ResponsesRequest, "validation"),
    "ResponsesInputTokensRequest": (responses.InputTokensRequest, "validation"),
    "ResponseObject": (responses.ResponseObject, "serialization"),
    "ResponseEvent": (responses.ResponseEvent, "serialization"),
    "ResponsesInputTokens": (responses.InputTokens, "serialization"),
    "DeletedResponse": (responses.DeletedResponse, "serialization"),
    "ResponseInputItemList": (responses.InputItemList, "serialization"),
    **{
        f"Anthropic_{name}": (model, "serialization")
        for name, model in anthropic.STREAM_EVENTS.items()
        if name != "error"
    },
    **ollama_doc.MODELS,
    **admin_doc.MODELS,
}


def _version() -> str:
    try:
        return metadata.version("mlx-server")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


def _obj(properties: dict[str, Schema], required: Sequence[str] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _generated() -> dict[str, Schema]:
    """Every model's schema (and the schemas they use), under their document names."""
    keys, top = models_json_schema(list(MODELS.values()), ref_template=REF)
    defs: dict[str, Schema] = dict(top.get("$defs", {}))
    renamed = {}
    for name, (model, mode) in MODELS.items():
        ref = keys[(model, mode)]["$ref"].rsplit("/", 1)[-1]
        renamed[ref] = name
    out: dict[str, Schema] = {}
    for ref, schema in defs.items():
        out[renamed.get(ref, ref)] = schema
    return _rename_refs(out, renamed)


def _rename_refs(node: Any, renamed: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_rename_refs(x, renamed) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rename_refs(v, renamed) for k, v in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in renamed:
        out["$ref"] = REF.format(model=renamed[ref.rsplit("/", 1)[-1]])
    return out


def _token_ids(node: Any, vocab_size: int | None) -> Any:
    """Token ids (marked `x-token-id` by `protocol.TokenId`) get the vocabulary's bound;
    numeric bounds get JSON Schema's names."""
    if isinstance(node, list):
        return [_token_ids(x, vocab_size) for x in node]
    if not isinstance(node, dict):
        return node
    out = {
        _BOUNDS.get(k, k) if node.get("type") in ("integer", "number") else k: _token_ids(
            v, vocab_size
        )
        for k, v in node.items()
        if k != "x-token-id"
    }
    if node.get("x-token-id") and vocab_size:
        out["maximum"] = vocab_size - 1
    return out


# pydantic writes a Field's bounds under their own names when the field's type has a validator
# in front of it (`protocol.Int`): JSON Schema's names, so the bounds are in the document.
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


_REGEX_SPECIALS = set("\\^$.|?*+()[]{}")


def _literal(c: str) -> str:
    """One character of a name as an ECMA-262 regex, matching either case."""
    if len(c.upper()) == 1 and c.lower() != c.upper():
        return f"[{c.lower()}{c.upper()}]"
    return "\\" + c if c in _REGEX_SPECIALS else c


def _name_pattern(name: str) -> str:
    """A regex matching `name` case-insensitively, as the model pool compares names."""
    return "^" + "".join(_literal(c) for c in name) + "$"


def _glob_pattern(glob: str) -> str:
    """A regex for a shell-style alias pattern (`claude-*`), case-insensitive like `fnmatch`
    on lowered names."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append("[\\s\\S]*")
        elif c == "?":
            out.append("[\\s\\S]")
        elif c == "[" and "]" in glob[i + 2 :]:
            end = glob.index("]", i + 2)
            body = glob[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            chars = "".join("\\" + ch if ch in "\\^]" else ch for ch in body.lower())
            chars += "".join("\\" + ch if ch in "\\^]" else ch for ch in body.upper())
            out.append("[" + ("^" if negate else "") + chars + "]")
            i = end
        else:
            out.append(_literal(c))
        i += 1
    return "^" + "".join(out) + "$"


# -- the document -------------------------------------------------------------------------------


class _Builder:
    """Builds the document for one server: its model names, vocabulary and auth setting."""

    def __init__(
        self,
        *,
        model_names: Sequence[str],
        model_aliases: Sequence[str],
        vocab_size: int | None,
        context_length: int | None,
        auth_required: bool,
    ) -> None:
        self.model_names = list(model_names)
        self.model_aliases = list(model_aliases)
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.auth_required = auth_required

    # -- shared pieces ------------------------------------------------------------------------

    def model_name(self, *, required: bool) -> Schema:
        """A served model's name. Names are matched case-insensitively; aliases may be patterns."""
        description = (
            "The served model: its name (case-insensitive), the last part of a repo id, "
            "'default', or an alias (`--model-aliases`). Other names get 404 model_not_found."
        )
        if not self.model_names:
            named: Schema = {"type": "string", "minLength": 1}
        else:
            patterns = [_name_pattern(n) for n in dict.fromkeys(self.model_names)]
            patterns += [_glob_pattern(a) for a in self.model_aliases]
            named = {
                "type": "string",
                "minLength": 1,
                "anyOf": [{"pattern": p} for p in patterns],
                "examples": [self.model_names[0]],
            }
        if required:
            return {**named, "description": description}
        return {
            "anyOf": [named, {"type": "string", "maxLength": 0}, {"type": "null"}],
            "description": description + " Optional: absent, null or '' mean the served model.",
        }

    def components(self) -> Schema:
        schemas = _token_ids(_generated(), self.vocab_size)
        for name in (
            "ChatCompletionRequest",
            "CompletionRequest",
            "EmbeddingRequest",
            "ResponsesRequest",
            "ResponsesInputTokensRequest",
        ):
            schemas[name]["properties"]["model"] = self.model_name(required=False)
        for name in ("MessagesRequest", "CountTokensRequest", *ollama_doc.NAMED_MODEL):
            schemas[name]["properties"]["model"] = self.model_name(required=True)
        schemas["AdminPullEvent"] = admin_doc.pull_event()
        schemas["ChatCompletionStreamEvent"] = _openai_event("ChatCompletionChunk")
        schemas["CompletionStreamEvent"] = _openai_event("Completion")
        schemas["ResponseStreamEvent"] = _sse_event(
            _json_text(ref("ResponseEvent")),
            event={"type": "string", "description": "the event's `type`"},
            description="One event of a Responses stream (response.created ... "
            "response.completed / incomplete / failed), each with its sequence_number.",
        )
        events = {name: f"Anthropic_{name}" for name in anthropic.STREAM_EVENTS}
        events["error"] = "AnthropicError"
        schemas["AnthropicStreamEvent"] = {
            "anyOf": [
                _sse_event(_json_text(ref(target)), event={"const": name})
                for name, target in events.items()
            ],
            "description": "One event of an Anthropic stream: message_start, ping, "
            "content_block_start/_delta/_stop, message_delta, message_stop, or error.",
        }
        return schemas

    # -- operations ---------------------------------------------------------------------------

    def responses(
        self,
        ok: dict[str, Any],
        *,
        anthropic: bool = False,
        statuses: Sequence[int] = (),
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"200": ok}
        error_ref = "#/components/responses/" + ("Anthropic" if anthropic else "OpenAI")
        for status in statuses:
            out[str(status)] = {"$ref": f"{error_ref}{status}"}
        return out

    def error_responses(self, *, anthropic: bool) -> dict[str, Any]:
        name = "Anthropic" if anthropic else "OpenAI"
        schema = ref("AnthropicError" if anthropic else "OpenAIError")
        descriptions = {
            400: "Invalid request: bad JSON, a wrong type or range (`param` names the field), "
            "a prompt longer than the context.",
            401: "Missing or wrong API key (only with --api-key).",
            404: "Unknown model (`model_not_found`) or no such route.",
            405: "Another method on this path: not allowed (with an Allow header).",
            413: "Request body larger than --max-body-bytes.",
            429: "Rate limit (--rate-limit, with Retry-After)"
            + ("." if anthropic else " or the queue is full (overloaded)."),
            500: "An internal failure (a bug, or the executor failed).",
            503: "The model is still loading, or the server is shutting down.",
            504: "The request ran past --timeout.",
            529: "Overloaded: the queue is full.",
        }
        headers = {
            "Retry-After": {
                "description": "Seconds to wait (rate limit answers).",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
        out: dict[str, Any] = {}
        for status, description in descriptions.items():
            if status == 529 and not anthropic:
                continue
            response: dict[str, Any] = {
                "description": description,
                "content": {"application/json": {"schema": schema}},
            }
            if status == 429:
                response["headers"] = headers
            out[f"{name}{status}"] = response
        return out

    def post(
        self,
        *,
        summary: str,
        operation_id: str,
        tag: str,
        request: str,
        ok: dict[str, Any],
        anthropic: bool = False,
        generates: bool = True,
    ) -> dict[str, Any]:
        statuses: list[int] = [400, 401, 404, 405, 413, 429, 500, 503, 504]
        if anthropic:
            statuses.append(529)
        if not generates:
            statuses.remove(504)
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": operation_id,
            "tags": [tag],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": ref(request),
                        "examples": self.examples(request),
                    }
                },
            },
            "responses": self.responses(ok, anthropic=anthropic, statuses=statuses),
        }
        if anthropic:
            op["parameters"] = [
                {
                    "name": "anthropic-version",
                    "in": "header",
                    "required": False,
                    "description": "Accepted (any version) and ignored.",
                    "schema": {"type": "string"},
                }
            ]
        return op

    def examples(self, request: str) -> dict[str, Any]:
        """Example requests (the fuzzer sends them too): a plain one and a streamed one."""
        model = self.model_names[0] if self.model_names else "default"
        question = "What is the capital of France?"
        chat = [{"role": "user", "content": question}]
        plain: dict[str, Any]
        streamed: dict[str, Any] | None = None
        if request == "ChatCompletionRequest":
            plain = {"model": model, "messages": chat, "max_completion_tokens": 16}
            streamed = {
                **plain,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logprobs": True,
                "top_logprobs": 2,
            }
        elif request == "CompletionRequest":
            plain = {"model": model, "prompt": "The capital of France is", "max_tokens": 8}
            streamed = {**plain, "stream": True, "echo": True, "logprobs": 2, "n": 2, "seed": 7}
        elif request == "EmbeddingRequest":
            plain = {"model": model, "input": ["Paris", "Rome"]}
            return {
                "float": {"value": plain},
                "base64": {"value": {**plain, "encoding_format": "base64"}},
            }
        elif request in ("ResponsesRequest", "ResponsesInputTokensRequest"):
            plain = {"model": model, "input": question, "max_output_tokens": 16}
            if request == "ResponsesRequest":
                streamed = {**plain, "instructions": "Answer briefly.", "stream": True}
        elif request == "MessagesRequest":
            plain = {"model": model, "max_tokens": 16, "messages": chat}
            streamed = {**plain, "system": "Answer briefly.", "stream": True, "temperature": 0}
        else:
            plain = {"model": model, "messages": chat, "system": "Answer briefly."}
        out: dict[str, Any] = {"plain": {"value": plain}}
        if streamed is not None:
            out["streamed"] = {"value": streamed}
        return out

    def get(
        self,
        *,
        summary: str,
        operation_id: str,
        tag: str,
        ok: dict[str, Any],
        statuses: Sequence[int] = (401, 405, 429, 503),
        open_route: bool = False,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": operation_id,
            "tags": [tag],
            "responses": self.responses(ok, statuses=statuses),
        }
        if open_route:
            op["security"] = []
        return op

    def paths(self) -> dict[str, Any]:
        def json_ok(description: str, schema: str) -> dict[str, Any]:
            return {
                "description": description,
                "content": {"application/json": {"schema": ref(schema)}},
            }

        def streaming_ok(description: str, schema: str, event: str) -> dict[str, Any]:
            ok = json_ok(description, schema)
            ok["content"]["text/event-stream"] = {"schema": ref(event)}
            return ok

        anthropic_headers = {
            "request-id": {
                "description": "An id for this request, as Anthropic sends.",
                "schema": {"type": "string"},
            }
        }
        messages_ok = streaming_ok(
            "The message, or (`stream: true`) Anthropic's event stream.",
            "AnthropicMessage",
            "AnthropicStreamEvent",
        )
        messages_ok["headers"] = anthropic_headers
        count_ok = json_ok("The prompt's token count.", "AnthropicTokenCount")
        count_ok["headers"] = anthropic_headers
        model_id = {
            "name": "model_id",
            "in": "path",
            "required": True,
            "description": "A served model name (or alias); others get 404.",
            "schema": {"type": "string", "minLength": 1},
        }
        if self.model_names:
            model_id["schema"] = {"enum": sorted(set(self.model_names))}
        response_id = {
            "name": "response_id",
            "in": "path",
            "required": True,
            "description": "The id of a stored response (`store: true`, the default).",
            "schema": {"type": "string", "minLength": 1},
        }
        return {
            "/v1/chat/completions": {
                "post": self.post(
                    summary="Create a chat completion (OpenAI)",
                    operation_id="createChatCompletion",
                    tag="OpenAI",
                    request="ChatCompletionRequest",
                    ok=streaming_ok(
                        "The completion, or (`stream: true`) chunks ending with `data: [DONE]`.",
                        "ChatCompletion",
                        "ChatCompletionStreamEvent",
                    ),
                )
            },
            "/v1/completions": {
                "post": self.post(
                    summary="Create a text completion (OpenAI legacy)",
                    operation_id="createCompletion",
                    tag="OpenAI",
                    request="CompletionRequest",
                    ok=streaming_ok(
                        "The completion, or (`stream: true`) chunks ending with `data: [DONE]`.",
                        "Completion",
                        "CompletionStreamEvent",
                    ),
                )
            },
            "/v1/embeddings": {
                "post": self.post(
                    summary="Create embeddings (OpenAI)",
                    operation_id="createEmbedding",
                    tag="OpenAI",
                    request="EmbeddingRequest",
                    ok=json_ok("The vectors, in input order.", "Embeddings"),
                )
            },
            "/v1/messages": {
                "post": self.post(
                    summary="Create a message (Anthropic)",
                    operation_id="createMessage",
                    tag="Anthropic",
                    request="MessagesRequest",
                    ok=messages_ok,
                    anthropic=True,
                )
            },
            "/v1/messages/count_tokens": {
                "post": self.post(
                    summary="Count a message request's input tokens (Anthropic)",
                    operation_id="countMessageTokens",
                    tag="Anthropic",
                    request="CountTokensRequest",
                    ok=count_ok,
                    anthropic=True,
                    generates=False,
                )
            },
            "/v1/responses": {
                "post": self.post(
                    summary="Create a response (OpenAI Responses API)",
                    operation_id="createResponse",
                    tag="OpenAI",
                    request="ResponsesRequest",
                    ok=streaming_ok(
                        "The response, or (`stream: true`) its typed events.",
                        "ResponseObject",
                        "ResponseStreamEvent",
                    ),
                )
            },
            "/v1/responses/input_tokens": {
                "post": self.post(
                    summary="Count a response request's input tokens (OpenAI)",
                    operation_id="countResponseInputTokens",
                    tag="OpenAI",
                    request="ResponsesInputTokensRequest",
                    ok=json_ok("The prompt's token count.", "ResponsesInputTokens"),
                    generates=False,
                )
            },
            "/v1/responses/{response_id}": {
                "get": {
                    **self.get(
                        summary="Retrieve a stored response",
                        operation_id="getResponse",
                        tag="OpenAI",
                        ok=json_ok("The stored response.", "ResponseObject"),
                        statuses=(401, 404, 405, 429, 503),
                    ),
                    "parameters": [response_id],
                },
                "delete": {
                    **self.get(
                        summary="Delete a stored response",
                        operation_id="deleteResponse",
                        tag="OpenAI",
                        ok=json_ok("Deleted.", "DeletedResponse"),
                        statuses=(401, 404, 405, 429, 503),
                    ),
                    "parameters": [response_id],
                },
            },
            "/v1/responses/{response_id}/input_items": {
                "get": {
                    **self.get(
                        summary="List a stored response's input items",
                        operation_id="listResponseInputItems",
                        tag="OpenAI",
                        ok=json_ok(
                            "The conversation it continued, newest first.", "ResponseInputItemList"
                        ),
                        statuses=(401, 404, 405, 429, 503),
                    ),
                    "parameters": [response_id],
                }
            },
            "/v1/models": {
                "get": self.get(
                    summary="List the served model",
                    operation_id="listModels",
                    tag="OpenAI",
                    ok=json_ok("The served model.", "ModelList"),
                )
            },
            "/v1/models/{model_id}": {
                "get": {
                    **self.get(
                        summary="Describe the served model",
                        operation_id="retrieveModel",
                        tag="OpenAI",
                        ok=json_ok("The served model.", "Model"),
                        statuses=(401, 404, 405, 429, 503),
                    ),
                    "parameters": [model_id],
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness: 200 once the model is loaded, else 503",
                    "operationId": "health",
                    "tags": ["Server"],
                    "security": [],
                    "responses": {
                        "200": json_ok("Ready.", "Health"),
                        "503": json_ok("Loading, failed or stopping.", "Health"),
                    },
                }
            },
            "/metrics": {
                "get": self.get(
                    summary="Prometheus metrics",
                    operation_id="metrics",
                    tag="Server",
                    ok={
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    statuses=(),
                    open_route=True,
                )
            },
            **ollama_doc.paths(self.model_names[0] if self.model_names else "default"),
            **admin_doc.paths(self.model_names[0] if self.model_names else "default"),
            DOCUMENT_PATH: {
                "get": self.get(
                    summary="This OpenAPI document",
                    operation_id="openapi",
                    tag="Server",
                    ok={
                        "description": "OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    statuses=(),
                    open_route=True,
                )
            },
        }

    def document(self) -> dict[str, Any]:
        security: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
        if not self.auth_required:
            security.append({})  # no --api-key: no key needed
        return {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": "mlx-server",
                "version": _version(),
                "description": "OpenAI- and Anthropic-compatible inference server for MLX.",
            },
            "tags": [
                {"name": "OpenAI", "description": "OpenAI-compatible routes."},
                {"name": "Anthropic", "description": "Anthropic Messages API routes."},
                {"name": ollama_doc.TAG, "description": ollama_doc.TAG_DESCRIPTION},
                {"name": admin_doc.TAG, "description": admin_doc.TAG_DESCRIPTION},
                {"name": "Server", "description": "Health, metrics and this document (open)."},
            ],
            "security": security,
            "paths": self.paths(),
            "components": {
                "schemas": self.components(),
                "responses": {
                    **self.error_responses(anthropic=False),
                    **self.error_responses(anthropic=True),
                    **ollama_doc.error_responses(),
                    **admin_doc.error_responses(),
                },
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "`Authorization: Bearer <--api-key>` (OpenAI style).",
                    },
                    "apiKeyAuth": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "x-api-key",
                        "description": "`x-api-key: <--api-key>` (Anthropic style).",
                    },
                },
            },
        }


def _openai_event(chunk: str) -> Schema:
    """One event of an OpenAI stream: a chunk, an in-band error (then [DONE]), or the final
    `data: [DONE]`."""
    payload = {"anyOf": [ref(chunk), ref("OpenAIError")]}
    return _sse_event(
        {"anyOf": [{"const": "[DONE]"}, _json_text(payload)]},
        event={"const": "message"},
        description=_openai_event.__doc__,
    )


def _json_text(schema: Schema) -> Schema:
    """A string holding JSON that matches `schema`."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _sse_event(data: Schema, *, event: Schema, description: str | None = None) -> Schema:
    """One server-sent event as OpenAPI 3.1 tools read a stream: `{event, data, id?, retry?}`."""
    schema = _obj({"event": event, "data": data}, ["data"])
    if description:
        schema["description"] = description
    return schema


def openapi_document(
    *,
    model_names: Sequence[str] = (),
    model_aliases: Sequence[str] = (),
    vocab_size: int | None = None,
    context_length: int | None = None,
    auth_required: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server serving `model_names` (empty while it loads)."""
    return _Builder(
        model_names=model_names,
        model_aliases=model_aliases,
        vocab_size=vocab_size,
        context_length=context_length,
        auth_required=auth_required,
    ).document()


def install_openapi(app: Quart, settings: Settings) -> None:
    """Serve `GET /openapi.json` (open, like /health) for this server's model and settings."""

    @app.get(DOCUMENT_PATH)
    async def _openapi() -> dict[str, Any]:
        pool = state().models
        if pool is None:
            return openapi_document(auth_required=settings.api_key is not None)
        names = [n for s in pool.slots for n in (s.name, s.name.rsplit("/", 1)[-1])]
        fe = pool.default.frontend
        single = fe is not None and len(pool.slots) == 1
        return openapi_document(
            model_names=[*names, "default"],
            model_aliases=pool.default.aliases,
            vocab_size=fe.vocab_size if single and fe else None,
            context_length=fe.context_length if single and fe else None,
            auth_required=settings.api_key is not None,
        )
