"""Ollama's routes, for the editor plugins and tools that speak only Ollama's API.

`/api/chat` and `/api/generate` are Ollama body -> chat-completions body (`convert.py`) -> the
OpenAI request model -> the one internal request -> `run` -> `OllamaRender`: NDJSON streaming
by default (`"stream": false` for one object), Ollama's field names, durations (nanoseconds) and
counts. `raw: true` generate goes through the completions path (the prompt as is). An empty
`messages` / `prompt` loads the model (`keep_alive: 0`: unloads it), as with Ollama.
`/api/tags`, `/api/show`, `/api/ps` describe the served models; `/api/embed` (and the legacy
`/api/embeddings`) embed with the model's pooled hidden states, like `/v1/embeddings`.

The API key, rate limit, body limit and timeouts are those of every route; errors are Ollama's
`{"error": "..."}` with the status Ollama uses (400 bad body, 404 unknown model, ...).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from quart import Blueprint, Response, request

from ... import hub
from ...actors.pool import ModelPool, ModelSlot
from ...errors import InvalidRequest, NotFound, RequestError
from ...generation import Request
from ...generation.prepare import check_length
from ...messages import PromptSpec
from .. import outcome
from ..admin.routes import PullOutcome, Update, start_pull
from ..openai import convert as openai_convert
from ..openai.protocol import ChatCompletionRequest, CompletionRequest
from ..protocol import Model, parse_bytes, parse_object
from ..run import run
from ..state import models, use_model
from . import convert
from . import protocol as p
from .render import Mode, OllamaRender, ndjson, timestamp

bp = Blueprint("ollama", __name__)
M = TypeVar("M", bound=Model)

# The Ollama API version these routes follow (clients compare it against features they need).
OLLAMA_API_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"


# -- reading requests -----------------------------------------------------------------------


async def _body(model: type[M]) -> M:
    """The request body as `model` (whatever its content type: Ollama's clients and the curl
    examples do not all send application/json); a 400 naming the bad field otherwise."""
    raw = await request.get_data(as_text=False)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    return parse_bytes(model, raw)


def _slot(value: str | None) -> ModelSlot:
    """The served model a request names; Ollama's `:latest` tag is the model itself."""
    if not value:
        raise InvalidRequest("'model' is required", param="model")
    pool = models()
    try:
        return pool.resolve(value)
    except NotFound:
        base, _, tag = value.rpartition(":")
        if base and tag == "latest":
            return pool.resolve(base)
        raise


def _ndjson(result: Response | dict[str, Any]) -> Response | dict[str, Any]:
    """A streamed answer goes out as NDJSON (what `run` streamed is already one JSON per line)."""
    if isinstance(result, Response):
        result.headers["Content-Type"] = NDJSON
    return result


# -- generation -------------------------------------------------------------------------------


@bp.post("/api/chat")
async def chat() -> Response | dict[str, Any]:
    body = await _body(p.ChatRequest)
    keep = convert.keep_alive(body.keep_alive)  # else accepted; models stay loaded
    slot = _slot(body.model)
    if not body.messages:
        return await _load_or_unload(slot, keep, "chat", body.stream is not False)
    chat = convert.chat_body(body) | {"model": slot.name}
    request_ = openai_convert.chat_request(parse_object(ChatCompletionRequest, chat))
    request_ = attrs.evolve(request_, stop=convert.stops(body.options))
    return _ndjson(await run(request_, OllamaRender(mode="chat")))


@bp.post("/api/generate")
async def generate() -> Response | dict[str, Any]:
    body = await _body(p.GenerateRequest)
    keep = convert.keep_alive(body.keep_alive)
    slot = _slot(body.model)
    if not body.prompt and not body.images:
        return await _load_or_unload(slot, keep, "generate", body.stream is not False)
    converted = convert.generate_body(body) | {"model": slot.name}
    request_: Request
    if converted.pop("raw", False):
        request_ = openai_convert.completion_request(parse_object(CompletionRequest, converted))
        if "max_tokens" not in converted:  # the server's default, not the completions API's 16
            request_ = attrs.evolve(request_, max_tokens=None)
    else:
        request_ = openai_convert.chat_request(parse_object(ChatCompletionRequest, converted))
    request_ = attrs.evolve(request_, stop=convert.stops(body.options))
    return _ndjson(await run(request_, OllamaRender(mode="generate")))


async def _load_or_unload(
    slot: ModelSlot, keep: float | None, mode: Mode, stream: bool
) -> Response | dict[str, Any]:
    """Ollama's way to load a model (an empty chat or prompt) or unload it (`keep_alive: 0`)."""
    if keep == 0:
        await models().unload(slot)
        reason = "unload"
    else:
        await use_model(slot.name)
        reason = "load"
    chunk: dict[str, Any] = {"model": slot.name, "created_at": timestamp()}
    if mode == "chat":
        chunk["message"] = {"role": "assistant", "content": ""}
    else:
        chunk["response"] = ""
    chunk.update(done=True, done_reason=reason)
    if stream:
        return Response(ndjson(chunk), status=200, content_type=NDJSON)
    return chunk


# -- embeddings -------------------------------------------------------------------------------


async def _embed(
    slot: ModelSlot, texts: list[str], *, truncate: bool, dimensions: int | None
) -> tuple[str, list[list[float]], int]:
    fe = await use_model(slot.name)
    inputs: list[tuple[int, ...]] = []
    for i, text in enumerate(texts):
        what = f"'input[{i}]'"
        ids = await fe.prompt_ids(PromptSpec(text=text), param="input", what=what)
        if truncate and len(ids) > fe.context_length:
            ids = ids[: fe.context_length]
        check_length(fe.context_length, ids, 0, param="input", what=what)
        inputs.append(ids)
    vectors = await fe.embed(inputs, dimensions=dimensions) if inputs else []
    tokens = sum(len(ids) for ids in inputs)
    outcome.current().prompt_tokens = tokens
    return fe.model_name, vectors, tokens


@bp.post("/api/embed")
async def embed() -> dict[str, Any]:
    body = await _body(p.EmbedRequest)
    convert.keep_alive(body.keep_alive)
    slot = _slot(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    started = time.monotonic()
    name, vectors, tokens = await _embed(
        slot, texts, truncate=body.truncate is not False, dimensions=body.dimensions
    )
    return {
        "model": name,
        "embeddings": vectors,
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": tokens,
    }


@bp.post("/api/embeddings")
async def embeddings() -> dict[str, Any]:
    """The legacy form: one `prompt`, one `embedding`."""
    body = await _body(p.EmbeddingsRequest)
    convert.keep_alive(body.keep_alive)
    slot = _slot(body.model)
    if not body.prompt:
        return {"embedding": []}
    _, vectors, _ = await _embed(slot, [body.prompt], truncate=True, dimensions=None)
    return {"embedding": vectors[0]}


# -- pulling ----------------------------------------------------------------------------------


def _repo(value: str | None) -> str:
    """A Hugging Face repo id from an Ollama model name (`hf.co/org/name:latest` too)."""
    name = value or ""
    for prefix in ("hf.co/", "huggingface.co/"):
        name = name.removeprefix(prefix)
    name = name.removesuffix(":latest")
    return hub.check_repo_id(name, param="model")


def _failure(message: str) -> RequestError:
    status = 404 if "not found" in message else 403 if "gated" in message else 502
    return RequestError(message, status=status)


async def _pull_lines(
    repo: str, receive: trio.MemoryReceiveChannel[Update], pool: ModelPool
) -> AsyncIterator[bytes]:
    digest = "sha256:" + hashlib.sha256(repo.encode()).hexdigest()
    yield ndjson({"status": "pulling manifest"})
    with receive:
        async for update in receive:
            if isinstance(update, hub.PullProgress):
                total = max(update.total, update.downloaded)
                line = {"status": f"pulling {repo}", "digest": digest, "total": total}
                yield ndjson({**line, "completed": update.downloaded})
            elif update.message is not None:
                yield ndjson({"error": update.message})
                return
            else:
                _serve(pool, update)
                yield ndjson({"status": "success"})
                return


def _serve(pool: ModelPool, pulled: PullOutcome) -> None:
    """A pulled repo is served from now on (loaded on its first request), as with Ollama."""
    cached = pulled.cached
    if cached is None or not cached.complete:
        return
    try:
        pool.resolve(cached.repo_id)
    except NotFound:
        pool.add(cached.repo_id, str(cached.path))


@bp.post("/api/pull")
async def pull() -> Response | dict[str, Any]:
    """Download a Hugging Face repo into the cache and serve it (Ollama's progress lines)."""
    body = await _body(p.PullRequest)
    repo = _repo(body.model or body.name)
    pool = models()
    receive = start_pull(repo, None)
    if body.stream is not False:
        return Response(_pull_lines(repo, receive, pool), status=200, content_type=NDJSON)
    async with receive:
        async for update in receive:
            if isinstance(update, PullOutcome):
                if update.message is not None:
                    raise _failure(update.message)
                _serve(pool, update)
                return {"status": "success"}
    raise RequestError(f"the pull of {repo} ended without a result", status=502)


# -- the model list ---------------------------------------------------------------------------


@bp.get("/api/version")
async def version() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION}


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat().replace("+00:00", "Z")


def _config(spec: str | None) -> dict[str, Any]:
    """The model's config.json, when it has one (a model directory or a cached repo)."""
    if spec is None:
        return {}
    try:
        path = Path(spec).expanduser()
        if not path.exists():
            cached = hub.find_cached(spec)
            path = cached.path if cached is not None else path
        if path.is_dir():
            found = [path / "config.json"] if (path / "config.json").is_file() else []
            found += sorted(path.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime)
            if found:
                data = json.loads(found[-1].read_text(encoding="utf-8"))
                return data if isinstance(data, dict) else {}
    except (OSError, ValueError, InvalidRequest):
        return {}
    return {}


def _details(slot: ModelSlot, config: dict[str, Any]) -> dict[str, Any]:
    family = config.get("model_type")
    family = family if isinstance(family, str) else ""
    quant = config.get("quantization")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    dtype = config.get("torch_dtype")
    level = f"Q{bits}" if bits else (dtype.upper() if isinstance(dtype, str) else "")
    gguf = slot.spec is None or str(slot.spec).lower().endswith(".gguf")
    return {
        "parent_model": "",
        "format": "gguf" if gguf else "safetensors",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": "",
        "quantization_level": level,
    }


def _digest(slot: ModelSlot) -> str:
    return hashlib.sha256(f"{slot.name}\0{slot.spec}".encode()).hexdigest()


async def _describe(slot: ModelSlot) -> tuple[dict[str, Any], dict[str, Any]]:
    """(details, config), the files read off the event loop."""
    config = await trio.to_thread.run_sync(_config, slot.spec)
    return _details(slot, config), config


async def _entry(slot: ModelSlot) -> dict[str, Any]:
    details, _ = await _describe(slot)
    return {
        "name": slot.name,
        "model": slot.name,
        "modified_at": _iso(slot.created),
        "size": slot.size,
        "digest": _digest(slot),
        "details": details,
    }


@bp.get("/api/tags")
async def tags() -> dict[str, Any]:
    return {"models": [await _entry(slot) for slot in models().slots]}


@bp.get("/api/ps")
async def ps() -> dict[str, Any]:
    pool = models()
    out = []
    for slot in pool.slots:
        fe = slot.frontend
        if fe is None:
            continue
        entry = await _entry(slot)
        left = pool.expires_in(slot)
        # Never unloaded: far in the future, as Ollama reports `keep_alive: -1`.
        expires = time.time() + left if left is not None else 253402214400.0
        entry.update(
            expires_at=_iso(expires), size_vram=slot.size, context_length=fe.context_length
        )
        out.append(entry)
    return {"models": out}


@bp.post("/api/show")
async def show() -> dict[str, Any]:
    body = await _body(p.ShowRequest)
    slot = _slot(body.model or body.name)
    details, config = await _describe(slot)
    fe = slot.frontend
    context = fe.context_length if fe is not None else config.get("max_position_embeddings")
    family = details["family"] or "llama"
    info: dict[str, Any] = {"general.architecture": family}
    if isinstance(context, int):
        info[f"{family}.context_length"] = context
    capabilities = ["completion", "tools"]  # every model gets tools (a generic prompt at worst)
    if fe is not None and fe.output_format.reasoning:
        capabilities.append("thinking")
    if fe is not None and fe.vision:
        capabilities.append("vision")
    return {
        "license": "",
        "modelfile": f"FROM {slot.name}\n",
        "parameters": "",
        "template": "",
        "details": details,
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": _iso(slot.created),
    }
