"""The admin routes in the server's OpenAPI document (`api/openapi.py` merges these); errors in
OpenAI's shape, the pull's progress as server-sent events."""

from __future__ import annotations

from typing import Any

from ..openapi_parts import ModelTable, Schema, ref
from . import protocol as p

TAG = "Admin"
TAG_DESCRIPTION = "Model management (`/admin/*`, behind --api-key): load, unload, pull."

MODELS: ModelTable = {
    "AdminModelRequest": (p.ModelRequest, "validation"),
    "AdminPullRequest": (p.PullRequest, "validation"),
    "AdminModels": (p.AdminModels, "serialization"),
    "AdminPullStart": (p.PullStart, "serialization"),
    "AdminPullProgress": (p.PullProgress, "serialization"),
    "AdminPullDone": (p.PullDone, "serialization"),
}


def error_responses() -> dict[str, Any]:
    return {
        "Admin409": {
            "description": "The model has requests in flight (`model_busy`).",
            "content": {"application/json": {"schema": ref("OpenAIError")}},
        }
    }


def pull_event() -> Schema:
    """One event of a pull: start, progress..., then done or error."""
    events = {
        "start": "AdminPullStart",
        "progress": "AdminPullProgress",
        "done": "AdminPullDone",
        "error": "OpenAIError",
    }
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "event": {"const": name},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": ref(target),
                    },
                },
                "required": ["data"],
            }
            for name, target in events.items()
        ],
        "description": pull_event.__doc__,
    }


def _responses(ok: Schema, statuses: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": ok}
    for status in statuses:
        target = "Admin409" if status == 409 else f"OpenAI{status}"
        out[str(status)] = {"$ref": f"#/components/responses/{target}"}
    return out


def _json(description: str, schema: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def _post(summary: str, operation_id: str, request: str, ok: Schema, example: Any) -> Schema:
    statuses = (400, 401, 404, 405, 409, 413, 429, 500, 503, 504)
    return {
        "summary": summary,
        "operationId": operation_id,
        "tags": [TAG],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ref(request),
                    "examples": {"plain": {"value": example}},
                }
            },
        },
        "responses": _responses(ok, statuses),
    }


def paths(model: str) -> dict[str, Any]:
    """The `/admin/*` paths; `model` names a served model in the examples."""
    return {
        "/admin/models": {
            "get": {
                "summary": "The served models and the local Hugging Face cache",
                "operationId": "adminModels",
                "tags": [TAG],
                "responses": _responses(
                    _json("Served models and cached repos.", "AdminModels"),
                    (401, 405, 429, 503),
                ),
            }
        },
        "/admin/models/load": {
            "post": _post(
                "Load a model (a served one, or a repo pulled into the cache)",
                "adminLoad",
                "AdminModelRequest",
                _json("The model, loaded.", "Model"),
                {"model": model},
            )
        },
        "/admin/models/unload": {
            "post": _post(
                "Unload a model",
                "adminUnload",
                "AdminModelRequest",
                _json("The model, unloaded.", "Model"),
                {"model": model},
            )
        },
        "/admin/models/pull": {
            "post": _post(
                "Pull a Hugging Face repo into the cache, with progress",
                "adminPull",
                "AdminPullRequest",
                {
                    "description": "Server-sent events: start, progress..., done or error.",
                    "content": {"text/event-stream": {"schema": ref("AdminPullEvent")}},
                },
                {"repo": "mlx-community/SmolLM2-135M-Instruct"},
            )
        },
    }
