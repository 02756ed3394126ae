"""parse -> convert -> **run** -> render: the glue between a dialect and the generation path.

`run` resolves the model (pinned until the handler returns), prepares the request, queues one
engine request per choice (all or none: a full queue is a 429 before any byte is sent), and
hands the events, watched by the request's outcome, to the dialect's renderer: whole, or as a
server-sent event stream whose end releases the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from quart import Response

from ..actors.frontend import Frontend
from ..generation import Prepared, Request, Tally, choice_requests, collect, prepare
from ..generation.fanout import nothing_to_generate
from ..messages import Deadline, StreamEvent
from . import outcome, sse
from .state import models, use_model

Events = AsyncIterator[tuple[int, StreamEvent]]


class Renderer(Protocol):
    """A dialect's response writer for one request."""

    async def begin(self, model: Frontend, prepared: Prepared) -> None:
        """Anything the response needs from the model before generating (completions' echo)."""

    def complete(self, prepared: Prepared, tally: Tally) -> dict[str, Any]: ...

    def stream(self, prepared: Prepared, tally: Tally, events: Events) -> AsyncIterator[bytes]: ...

    def prefixes(self) -> list[str]:
        """Text each choice starts with that the engine did not generate (echo)."""
        ...


async def model_for(request: Request, deadline: Deadline | None = None) -> Frontend:
    models()  # 503 until the server is ready
    return await use_model(request.model, deadline=deadline)


async def run(request: Request, render: Renderer) -> Response | dict[str, Any]:
    deadline = models().deadline()  # one budget: loading the model, queueing, generating
    model = await model_for(request, deadline)
    prepared = await prepare(model, request)
    await render.begin(model, prepared)
    tally = Tally.of(prepared.choices, n=request.n, prompt_tokens=prepared.prompt_tokens)
    watch = outcome.current()

    def observed(events: Events) -> Events:
        return watch.observe(
            events,
            prompt_tokens=prepared.prompt_tokens,
            choices_per_prompt=request.n,
            prefixes=render.prefixes(),
        )

    if request.max_tokens == 0:  # completions: nothing to generate
        events = observed(nothing_to_generate(prepared))
        if request.stream:
            return _sse(render.stream(prepared, tally, events))
        return render.complete(prepared, await collect(events, tally))
    handle = model.start_streams(choice_requests(prepared), prepared.output, deadline)
    if request.stream:
        body = render.stream(prepared, tally, observed(handle.events))
        return _sse(sse.ClosingBody(body, handle.close))
    with handle as events:
        return render.complete(prepared, await collect(observed(events), tally))


def _sse(body: AsyncIterator[bytes]) -> Response:
    return Response(body, status=200, headers=sse.SSE_HEADERS)  # type: ignore[arg-type]
