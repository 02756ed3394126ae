"""`/admin/models*`: the served models and the local cache; load, unload, pull.

- `GET /admin/models`: the served models (as in `/v1/models`, with their state) and the model
  repos in the Hugging Face cache.
- `POST /admin/models/load {"model"}`: load a served model now; a repo id pulled into the cache
  but not served yet is added to the served models first (under its repo id). Answers when the
  model is loaded.
- `POST /admin/models/unload {"model"}`: unload it (409 while it has requests in flight).
- `POST /admin/models/pull {"repo", "revision"?}`: download a repo's model files into the cache,
  answered as server-sent events: `progress` (bytes done of the total known so far), then
  `done` or `error`. The download runs in a worker thread in the server's nursery: a client
  that leaves does not stop it.

Repo ids and revisions are checked (`hub.check_repo_id`, `hub.check_revision`) before anything
touches the disk or the network, and models are loaded only from the served list or the cache:
no request names a path.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import trio
from quart import Blueprint, Response, current_app

from ... import hub
from ...actors.pool import ModelPool, ModelSlot
from ...errors import MlxServerError, NotFound, RequestError
from .. import sse
from ..errors import openai_error_body
from ..openai.routes import model_json
from ..protocol import parse
from ..state import models
from .protocol import ModelRequest, PullRequest

bp = Blueprint("admin", __name__)


def _cached_json(model: hub.CachedModel, pool: ModelPool) -> dict[str, Any]:
    served = any(s.name.lower() == model.repo_id.lower() for s in pool.slots)
    return {
        "repo": model.repo_id,
        "size_bytes": model.size_bytes,
        "files": model.files,
        "modified": int(model.modified),
        "complete": model.complete,
        "served": served,
    }


@bp.get("/admin/models")
async def list_models() -> dict[str, Any]:
    pool = models()
    cached = await trio.to_thread.run_sync(hub.list_cached)
    return {
        "object": "list",
        "data": [model_json(slot, pool) for slot in pool.slots],
        "cache": [_cached_json(m, pool) for m in cached],
    }


async def _slot_to_load(pool: ModelPool, name: str) -> ModelSlot:
    """A served model, or a complete repo in the cache (then served from now on)."""
    try:
        return pool.resolve(name)
    except NotFound as missing:
        try:
            hub.check_repo_id(name)
        except hub.BadRepoId:
            raise missing from None
        cached = await trio.to_thread.run_sync(hub.find_cached, name)
        if cached is None or not cached.complete:
            raise NotFound(
                f"the model {name!r} is neither served nor in the local cache; pull it first "
                "(POST /admin/models/pull)",
                param="model",
                code="model_not_found",
            ) from None
        try:  # another request may have added it meanwhile
            return pool.resolve(name)
        except NotFound:
            return pool.add(cached.repo_id, str(cached.path))


@bp.post("/admin/models/load")
async def load() -> dict[str, Any]:
    body = await parse(ModelRequest)
    pool = models()
    slot = await _slot_to_load(pool, body.model)
    try:
        await pool.load(slot)
    except RequestError:
        raise
    except MlxServerError as exc:
        raise RequestError(
            f"the model {slot.name!r} failed to load: {exc}",
            status=500,
            kind="server_error",
            code="model_load_failed",
        ) from None
    return model_json(slot, pool)


@bp.post("/admin/models/unload")
async def unload() -> dict[str, Any]:
    body = await parse(ModelRequest)
    pool = models()
    slot = pool.resolve(body.model)
    await pool.unload(slot)
    return model_json(slot, pool)


# -- pull -------------------------------------------------------------------------------------


@attrs.frozen
class PullOutcome:
    """How a pull ended: `cached` (the repo in the cache) on success, else `message`."""

    repo: str
    cached: hub.CachedModel | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.message is None


Update = hub.PullProgress | PullOutcome


def start_pull(repo: str, revision: str | None) -> trio.MemoryReceiveChannel[Update]:
    """Start pulling `repo` (checked already) in the server's nursery; its progress, then its
    outcome, arrive on the returned channel. The download goes on if nobody reads."""
    send, receive = trio.open_memory_channel[Update](math.inf)
    current_app.nursery.start_soon(_pull, repo, revision, send)  # type: ignore[attr-defined]
    return receive


async def _pull(repo: str, revision: str | None, send: trio.MemorySendChannel[Update]) -> None:
    """Download in a worker thread; progress and the outcome go to `send` while anyone reads."""

    token = trio.lowlevel.current_trio_token()

    def report(progress: hub.PullProgress) -> None:  # in huggingface_hub's download threads
        try:
            trio.from_thread.run_sync(send.send_nowait, progress, trio_token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            pass  # the client left (or the server stops): the download goes on

    def work() -> hub.CachedModel | None:
        hub.pull(repo, revision=revision, progress=report)
        return hub.find_cached(repo)

    with send:
        try:
            cached = await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except Exception as exc:  # a task in the server's nursery must not raise
            message = str(exc) if isinstance(exc, MlxServerError) else f"pull failed: {exc!r}"
            outcome = PullOutcome(repo=repo, message=message)
        else:
            outcome = PullOutcome(repo=repo, cached=cached)
        try:
            send.send_nowait(outcome)
        except (trio.BrokenResourceError, trio.WouldBlock):
            pass


async def _events(repo: str, receive: trio.MemoryReceiveChannel[Update]) -> Any:
    yield sse.event("start", {"repo": repo, "status": "pulling"})
    with receive:
        async for update in receive:
            if isinstance(update, hub.PullProgress):
                total = max(update.total, update.downloaded)
                percent = round(100 * update.downloaded / total, 1) if total else 0.0
                yield sse.event(
                    "progress",
                    {
                        "repo": repo,
                        "downloaded": update.downloaded,
                        "total": total,
                        "percent": percent,
                        "done": update.done,
                    },
                )
            elif update.message is not None:
                body = openai_error_body(
                    update.message, status=502, kind="server_error", code="pull_failed"
                )
                yield sse.event("error", body)
                return
            else:
                done: dict[str, Any] = {"repo": repo, "status": "success"}
                if update.cached is not None:
                    done.update(size_bytes=update.cached.size_bytes, files=update.cached.files)
                    done["complete"] = update.cached.complete
                yield sse.event("done", done)
                return


@bp.post("/admin/models/pull")
async def pull() -> Response:
    body = await parse(PullRequest)
    repo = hub.check_repo_id(body.repo, param="repo")
    revision = hub.check_revision(body.revision) if body.revision is not None else None
    receive = start_pull(repo, revision)
    return Response(_events(repo, receive), status=200, headers=sse.SSE_HEADERS)  # type: ignore[arg-type]
