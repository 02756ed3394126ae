"""Ollama's routes in the server's OpenAPI document (`api/openapi.py` merges these): request and
response schemas from `protocol.py`, errors in Ollama's `{"error": ...}` shape, NDJSON streams
described one line at a time."""

from __future__ import annotations

from typing import Any

from ..openapi_parts import ModelTable, Schema, ref
from . import protocol as p

TAG = "Ollama"
TAG_DESCRIPTION = 'Ollama-compatible routes (`/api/*`): NDJSON streams, `{"error": ...}` errors.'

MODELS: ModelTable = {
    "OllamaChatRequest": (p.ChatRequest, "validation"),
    "OllamaGenerateRequest": (p.GenerateRequest, "validation"),
    "OllamaEmbedRequest": (p.EmbedRequest, "validation"),
    "OllamaEmbeddingsRequest": (p.EmbeddingsRequest, "validation"),
    "OllamaShowRequest": (p.ShowRequest, "validation"),
    "OllamaPullRequest": (p.PullRequest, "validation"),
    "OllamaPullStatus": (p.PullStatus, "serialization"),
    "OllamaChatAnswer": (p.ChatAnswer, "serialization"),
    "OllamaGenerateAnswer": (p.GenerateAnswer, "serialization"),
    "OllamaEmbedded": (p.Embedded, "serialization"),
    "OllamaEmbeddedLegacy": (p.EmbeddedLegacy, "serialization"),
    "OllamaTags": (p.Tags, "serialization"),
    "OllamaRunning": (p.Running, "serialization"),
    "OllamaShow": (p.ShowResponse, "serialization"),
    "OllamaVersion": (p.Version, "serialization"),
    "OllamaError": (p.OllamaError, "serialization"),
}
# Requests whose `model` must name a served model.
NAMED_MODEL = (
    "OllamaChatRequest",
    "OllamaGenerateRequest",
    "OllamaEmbedRequest",
    "OllamaEmbeddingsRequest",
)

_ERRORS = {
    400: "Invalid request: bad JSON, a wrong type or range, a prompt longer than the context.",
    401: "Missing or wrong API key (only with --api-key).",
    403: "A gated repo (a pull).",
    404: "Unknown model or no such route.",
    405: "Another method on this path: not allowed (with an Allow header).",
    409: "The model has requests in flight (an unload).",
    413: "Request body larger than --max-body-bytes.",
    429: "Rate limit (--rate-limit, with Retry-After) or the queue is full.",
    500: "An internal failure.",
    503: "The model is still loading, or the server is shutting down.",
    502: "The hub could not be reached, or the download failed (a pull).",
    504: "The request ran past --timeout.",
}


def error_responses() -> dict[str, Any]:
    return {
        f"Ollama{status}": {
            "description": description,
            "content": {"application/json": {"schema": ref("OllamaError")}},
        }
        for status, description in _ERRORS.items()
    }


def _responses(ok: Schema, statuses: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": ok}
    for status in statuses:
        out[str(status)] = {"$ref": f"#/components/responses/Ollama{status}"}
    return out


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _answer(description: str, name: str) -> Schema:
    """A whole answer (`"stream": false`) or an NDJSON stream of the same objects (an error after
    the stream began is a last `{"error": ...}` line)."""
    line = {"anyOf": [ref(name), ref("OllamaError")]}
    return {
        "description": description,
        "content": {
            "application/json": {"schema": ref(name)},
            "application/x-ndjson": {"schema": line},  # one object per line
        },
    }


_POST = (400, 401, 404, 405, 413, 429, 500, 503)
_GET = (401, 405, 429, 503)


def _post(
    summary: str, operation_id: str, request: str, ok: Schema, examples: dict[str, Any]
) -> Schema:
    statuses = (*_POST, 504) if request in NAMED_MODEL else _POST
    if request in ("OllamaChatRequest", "OllamaGenerateRequest"):
        statuses = (*statuses, 409)  # an unload (`keep_alive: 0`) while the model is busy
    if request == "OllamaPullRequest":
        statuses = (*statuses, 403, 502)
    return {
        "summary": summary,
        "operationId": operation_id,
        "tags": [TAG],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ref(request), "examples": examples}},
        },
        "responses": _responses(ok, tuple(sorted(statuses))),
    }


def _get(summary: str, operation_id: str, ok: Schema) -> Schema:
    return {
        "summary": summary,
        "operationId": operation_id,
        "tags": [TAG],
        "responses": _responses(ok, _GET),
    }


def paths(model: str) -> dict[str, Any]:
    """The `/api/*` paths; `model` names a served model in the examples."""
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    return {
        "/api/chat": {
            "post": _post(
                "Chat (Ollama)",
                "ollamaChat",
                "OllamaChatRequest",
                _answer("The answer (NDJSON unless `stream` is false).", "OllamaChatAnswer"),
                {
                    "whole": {
                        "value": {
                            "model": model,
                            "messages": chat,
                            "stream": False,
                            "options": {"num_predict": 8},
                        }
                    },
                    "streamed": {"value": {"model": model, "messages": chat}},
                },
            )
        },
        "/api/generate": {
            "post": _post(
                "Generate (Ollama)",
                "ollamaGenerate",
                "OllamaGenerateRequest",
                _answer("The answer (NDJSON unless `stream` is false).", "OllamaGenerateAnswer"),
                {
                    "whole": {
                        "value": {
                            "model": model,
                            "prompt": "The capital of France is",
                            "stream": False,
                        }
                    },
                    "raw": {"value": {"model": model, "prompt": "Paris is", "raw": True}},
                },
            )
        },
        "/api/embed": {
            "post": _post(
                "Embed (Ollama)",
                "ollamaEmbed",
                "OllamaEmbedRequest",
                _json("The vectors, in input order.", ref("OllamaEmbedded")),
                {"plain": {"value": {"model": model, "input": ["Paris", "Rome"]}}},
            )
        },
        "/api/embeddings": {
            "post": _post(
                "Embed one prompt (Ollama, legacy)",
                "ollamaEmbeddings",
                "OllamaEmbeddingsRequest",
                _json("The vector.", ref("OllamaEmbeddedLegacy")),
                {"plain": {"value": {"model": model, "prompt": "Paris"}}},
            )
        },
        "/api/show": {
            "post": _post(
                "Describe a model (Ollama)",
                "ollamaShow",
                "OllamaShowRequest",
                _json("The model's details and capabilities.", ref("OllamaShow")),
                {"plain": {"value": {"model": model}}},
            )
        },
        "/api/pull": {
            "post": {
                **_post(
                    "Pull a Hugging Face repo into the cache and serve it (Ollama)",
                    "ollamaPull",
                    "OllamaPullRequest",
                    _answer(
                        "`success` (NDJSON progress unless `stream` is false).", "OllamaPullStatus"
                    ),
                    {"plain": {"value": {"model": "mlx-community/SmolLM2-135M-Instruct"}}},
                ),
            }
        },
        "/api/tags": {
            "get": _get("The served models (Ollama)", "ollamaTags", _json("", ref("OllamaTags")))
        },
        "/api/ps": {
            "get": _get("The loaded models (Ollama)", "ollamaPs", _json("", ref("OllamaRunning")))
        },
        "/api/version": {
            "get": _get(
                "The Ollama API version followed", "ollamaVersion", _json("", ref("OllamaVersion"))
            )
        },
    }
