"""The scheduler actor: admission, the bound on waiting requests, batch composition and aborts.

It keeps up to `max_running` requests in the executor and a bounded queue of waiting ones, asks
the cache manager for a reusable prompt prefix before admitting a request, and routes each
executor event to the channel of the request it belongs to. It never blocks on the executor:
commands go out through a thread-safe queue, step outputs come back into the inbox.

Requests that arrive together are admitted together: the inbox is drained before admitting, and
a round's prefix lookups (one round trip to the cache manager) finish before its `Admit`s go out
back to back, so the executor
finds the whole burst in its inbox and reads the fresh prompts in one batch. `admissions` keeps
each recent request's timeline (submitted, admitted, first prompt chunk read, first token) and
the admission round it belonged to.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ..errors import Overloaded
from ..messages import (
    Abort,
    Admit,
    ExecutorCommand,
    GenerationRequest,
    PrefillProgress,
    SequenceFailed,
    SequenceFinished,
    StepOutput,
    TokenOut,
)
from .cache import CacheManager

log = logging.getLogger(__name__)

EngineEvent = TokenOut | PrefillProgress | SequenceFinished | SequenceFailed


class GenerationMetrics(Protocol):
    """Where the scheduler and the stream actors report what the engine did (the /metrics
    counters). Counting here, not in the HTTP layer, means tokens the engine generates for a
    client that has gone are still counted, and stop being counted once it really stops."""

    def tokens_generated(self, count: int) -> None: ...

    def sequence_finished(self, *, prompt_tokens: int, cached_tokens: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def timed_out(self) -> None: ...

    def drafts(self, *, proposed: int, accepted: int) -> None: ...

    def kv_cache(self, *, active_bytes: int, disk_hits: int) -> None: ...


class _NoMetrics:
    def tokens_generated(self, count: int) -> None:
        pass

    def sequence_finished(self, *, prompt_tokens: int, cached_tokens: int) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def timed_out(self) -> None:
        pass

    def drafts(self, *, proposed: int, accepted: int) -> None:
        pass

    def kv_cache(self, *, active_bytes: int, disk_hits: int) -> None:
        pass


@attrs.frozen(kw_only=True)
class _Submit:
    request: GenerationRequest
    events: trio.MemorySendChannel[EngineEvent]
    submitted_at: float


@attrs.frozen(kw_only=True)
class _AbortRequest:
    request_id: str


@attrs.define(eq=False)
class Admission:
    """One request's way in (trio clock seconds): the admission round it joined, when it was
    submitted, sent to the executor, had its first prompt chunk read and got its first token."""

    request_id: str
    round: int = 0
    submitted_at: float = 0.0
    admitted_at: float | None = None
    prefill_at: float | None = None
    first_token_at: float | None = None


@attrs.define(eq=False)
class _Tracked:
    request: GenerationRequest
    events: trio.MemorySendChannel[EngineEvent]
    submitted_at: float = 0.0
    got_token: bool = False
    admission: Admission | None = None


class Scheduler:
    def __init__(
        self,
        send_to_executor: Callable[[ExecutorCommand], None],
        cache: CacheManager,
        *,
        max_running: int,
        max_waiting: int,
    ) -> None:
        self._to_executor = send_to_executor
        self._cache = cache
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[
            _Submit | _AbortRequest | StepOutput
        ](math.inf)
        self._waiting: collections.OrderedDict[str, _Tracked] = collections.OrderedDict()
        self._running: dict[str, _Tracked] = {}
        self._submitted = 0  # accepted but not yet finished, counted at submit time
        self.last_batch_size = 0
        self.steps = 0
        self.rounds = 0  # admission rounds that admitted at least one request
        self.admissions: collections.deque[Admission] = collections.deque(maxlen=1024)
        self._idle = trio.Event()
        self.metrics: GenerationMetrics = _NoMetrics()

    # -- called from other tasks (same trio thread) ----------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return max(0, self._submitted - len(self._running))

    def submit(self, request: GenerationRequest) -> trio.MemoryReceiveChannel[EngineEvent]:
        """Queue a request; its events arrive on the returned channel, ending with
        SequenceFinished or SequenceFailed. Raises Overloaded when the queue is full."""
        if self._submitted >= self.max_running + self.max_waiting:
            raise Overloaded(
                "the server is at capacity; retry later", code="server_overloaded", status=429
            )
        send, recv = trio.open_memory_channel[EngineEvent](math.inf)
        self._submitted += 1
        self._inbox_send.send_nowait(
            _Submit(request=request, events=send, submitted_at=trio.current_time())
        )
        return recv

    async def wait_idle(self) -> None:
        """Return once no request is waiting or running."""
        while self._submitted:
            if self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    def _done_one(self) -> None:
        self._submitted -= 1
        if not self._submitted:
            self._idle.set()

    def abort(self, request_id: str) -> None:
        """Ask for a request to be dropped (no-op if it has already finished)."""
        try:
            self._inbox_send.send_nowait(_AbortRequest(request_id=request_id))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def on_executor_output(self, output: StepOutput) -> None:
        """Called (via run_sync_soon) on the trio thread for each executor step."""
        try:
            self._inbox_send.send_nowait(output)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # -- the actor -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for msg in self._inbox_recv:
                self._take(msg)
                # Everything already queued is taken in before admitting: a burst of arrivals
                # is one admission round, not one round per request.
                while True:
                    try:
                        more = self._inbox_recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._take(more)
                await self._admit()
        finally:
            for tracked in [*self._waiting.values(), *self._running.values()]:
                tracked.events.close()

    def _take(self, msg: _Submit | _AbortRequest | StepOutput) -> None:
        if isinstance(msg, _Submit):
            self._waiting[msg.request.request_id] = _Tracked(
                request=msg.request, events=msg.events, submitted_at=msg.submitted_at
            )
        elif isinstance(msg, _AbortRequest):
            self._abort(msg.request_id)
        else:
            self._route(msg)

    def fail_all(self, message: str) -> None:
        """End every request now with an error (shutdown after the grace period)."""
        for rid, tracked in [*self._waiting.items(), *self._running.items()]:
            if rid in self._running:
                self._to_executor(Abort(request_id=rid))
            _deliver(tracked, SequenceFailed(request_id=rid, message=message, status=503))
            tracked.events.close()
            self._done_one()
        self._waiting.clear()
        self._running.clear()

    def _abort(self, request_id: str) -> None:
        tracked = self._waiting.pop(request_id, None)
        if tracked is not None:
            self._done_one()
            _deliver(
                tracked,
                SequenceFinished(
                    request_id=request_id,
                    finish_reason="abort",
                    prompt_tokens=len(tracked.request.prompt_ids),
                    cached_tokens=0,
                    completion_tokens=0,
                ),
            )
            tracked.events.close()
        elif request_id in self._running:
            self._to_executor(Abort(request_id=request_id))

    def _route(self, output: StepOutput) -> None:
        self.steps += 1
        self.last_batch_size = output.batch_size
        generated = 0
        for event in output.events:
            if isinstance(event, TokenOut):
                generated += 1
            elif isinstance(event, SequenceFinished):
                self.metrics.sequence_finished(
                    prompt_tokens=event.prompt_tokens, cached_tokens=event.cached_tokens
                )
            tracked = self._running.get(event.request_id)
            if tracked is None:
                continue
            record = tracked.admission
            if record is not None and record.prefill_at is None:
                if isinstance(event, PrefillProgress) and event.done > event.cached:
                    record.prefill_at = trio.current_time()
            if isinstance(event, TokenOut) and not tracked.got_token:
                tracked.got_token = True
                now = trio.current_time()
                self.metrics.first_token(now - tracked.submitted_at)
                if record is not None:
                    record.first_token_at = now
                    if record.prefill_at is None:  # read in the step that sampled it
                        record.prefill_at = now
                    log.debug(
                        "%s: admitted in round %d after %.1f ms, first token after %.1f ms",
                        record.request_id,
                        record.round,
                        1000 * ((record.admitted_at or now) - record.submitted_at),
                        1000 * (now - record.submitted_at),
                    )
            if isinstance(event, SequenceFinished | SequenceFailed):
                del self._running[event.request_id]
                self._done_one()
                if isinstance(event, SequenceFinished) and event.stored is not None:
                    self._cache.store(event.stored)
                _deliver(tracked, event)
                tracked.events.close()
            elif not _deliver(tracked, event):
                # The stream actor is gone (client disconnected); stop generating.
                self._to_executor(Abort(request_id=event.request_id))
        if generated:
            self.metrics.tokens_generated(generated)
        if output.drafted:
            self.metrics.drafts(proposed=output.drafted, accepted=output.accepted)
        if output.kv_bytes >= 0 or output.disk_hits:
            self.metrics.kv_cache(active_bytes=output.kv_bytes, disk_hits=output.disk_hits)

    async def _admit(self) -> None:
        """One admission round: every waiting request that fits, its prefix looked up first,
        then all of the round's `Admit`s sent back to back."""
        batch: list[_Tracked] = []
        while self._waiting and len(self._running) < self.max_running:
            rid, tracked = self._waiting.popitem(last=False)
            self._running[rid] = tracked  # before any await, so shutdown still closes it
            batch.append(tracked)
        if not batch:
            return
        self.rounds += 1
        prefixes = await self._cache.lookup_many([t.request.prompt_ids for t in batch])
        now = trio.current_time()
        for tracked, prefix in zip(batch, prefixes, strict=True):
            rid = tracked.request.request_id
            if self._running.get(rid) is not tracked:
                continue  # ended meanwhile (fail_all at shutdown)
            tracked.admission = Admission(
                request_id=rid,
                round=self.rounds,
                submitted_at=tracked.submitted_at,
                admitted_at=now,
            )
            self.admissions.append(tracked.admission)
            self._to_executor(Admit(request=tracked.request, prefix=prefix))


def _deliver(tracked: _Tracked, event: EngineEvent) -> bool:
    try:
        tracked.events.send_nowait(event)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
