"""OpenAI's routes: each one parse -> convert -> run -> render."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from ...actors.pool import ModelPool, ModelSlot
from ...generation.prepare import check_length
from .. import outcome
from ..anthropic import render as anthropic_render
from ..errors import is_anthropic_request
from ..protocol import parse
from ..run import run
from ..state import models, use_model
from . import convert, render
from .protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

bp = Blueprint("openai", __name__)


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response | dict[str, Any]:
    body = await parse(ChatCompletionRequest)
    request = convert.chat_request(body)
    renderer = render.ChatRender(
        include_usage=convert.include_usage(body), timings=bool(body.timings)
    )
    return await run(request, renderer)


@bp.post("/v1/completions")
async def completions() -> Response | dict[str, Any]:
    body = await parse(CompletionRequest)
    request = convert.completion_request(body)
    renderer = render.CompletionRender(
        echo=bool(body.echo),
        include_usage=convert.include_usage(body),
        timings=bool(body.timings),
    )
    return await run(request, renderer)


@bp.post("/v1/embeddings")
async def embeddings() -> Response | dict[str, Any]:
    """Each input's vector is the mean of the model's final hidden states over its tokens,
    L2-normalised (`engine.embeddings`); `dimensions` truncates it and normalises again."""
    body = await parse(EmbeddingRequest)
    deadline = models().deadline()  # 503 until the server is ready
    fe = await use_model(body.model, deadline=deadline)
    inputs: list[tuple[int, ...]] = []
    for i, spec in enumerate(convert.prompt_specs(body.input, param="input")):
        what = f"'input[{i}]'"
        ids = await fe.prompt_ids(spec, param="input", what=what)
        check_length(fe.context_length, ids, 0, param="input", what=what)
        inputs.append(ids)
    vectors = await fe.embed(inputs, dimensions=body.dimensions, deadline=deadline)
    tokens = sum(len(ids) for ids in inputs)
    outcome.current().prompt_tokens = tokens
    return render.embeddings_json(
        vectors, model=fe.model_name, tokens=tokens, encoding=body.encoding_format or "float"
    )


@bp.get("/v1/models")
async def list_models() -> dict[str, Any]:
    pool = models()
    if is_anthropic_request():  # Anthropic's client sends `anthropic-version`
        return anthropic_render.model_list_json(pool.slots)
    return {"object": "list", "data": [model_json(slot, pool) for slot in pool.slots]}


@bp.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> dict[str, Any]:
    pool = models()
    if is_anthropic_request():
        return anthropic_render.model_info_json(pool.resolve(model_id))
    return model_json(pool.resolve(model_id), pool)


def model_json(slot: ModelSlot, pool: ModelPool) -> dict[str, Any]:
    """OpenAI's model object, exactly, plus `metadata`: the model's state ("loaded", "loading",
    "available": served, not in memory), size in bytes (estimated until loaded), context length
    once loaded, seconds until an idle unload (`--idle-unload`), the last load error, and once
    loaded its capabilities (completion, tools, reasoning, vision), model type, quantization,
    whether tools go through its own template or the generic tool prompt, and its size on
    disk."""
    fe = slot.frontend
    meta: dict[str, Any] = {
        "state": slot.state,
        "default": slot.default,
        "aliases": list(slot.aliases),
        "size_bytes": slot.size,
        "context_length": fe.context_length if fe is not None else None,
        "unload_in": pool.expires_in(slot),
    }
    if slot.load_error is not None and fe is None:
        meta["load_error"] = str(slot.load_error)
    info = fe.model_info if fe is not None else None
    if info is not None:  # what a client can plan with, once the model is loaded
        meta["capabilities"] = list(info.capabilities)
        meta["model_type"] = info.model_type
        meta["quantization"] = info.quantization.label if info.quantization else None
        meta["tool_prompt"] = "generic" if info.tool_fallback else "template"
        meta["disk_bytes"] = info.size_bytes
    return {
        "id": slot.name,
        "object": "model",
        "created": slot.created,
        "owned_by": "mlx-server",
        "metadata": meta,
    }
