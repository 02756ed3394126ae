"""The per-request stream actor: turns one request's token events into text deltas.

It detokenizes incrementally, applies stop strings (sending an abort back to the scheduler when
one matches, as vLLM's output processor does), counts usage, enforces the request's hard deadline
and, whatever way it ends (finished, cancelled because the client left, timed out), makes sure the
request leaves the executor.
"""

from __future__ import annotations

import contextlib
import logging

import trio

from ..engine.detokenizer import StreamingDetokenizer
from ..engine.stop import StopMatcher
from ..engine.tokenizer import Tokenizer
from ..messages import (
    Deadline,
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    Heartbeat,
    PrefillProgress,
    SequenceFailed,
    SequenceFinished,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    TokenOut,
    Usage,
)
from ..tools.output import OutputParser
from .scheduler import EngineEvent, Scheduler

log = logging.getLogger(__name__)


class RequestStream:
    def __init__(
        self,
        request: GenerationRequest,
        events: trio.MemoryReceiveChannel[EngineEvent],
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        *,
        deadline: Deadline,
        output: OutputParser | None = None,
        keep_special: frozenset[int] = frozenset(),
    ) -> None:
        self.request = request
        self._events = events
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._detok = StreamingDetokenizer(tokenizer, keep_special=keep_special)
        self._output = output  # tool calls and reasoning, when the request wants them
        self._stops = StopMatcher(request.stop)
        self._deadline = deadline
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.first_token_at: float | None = None

    def _usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.request.prompt_ids),
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
        )

    async def run(self, out: trio.MemorySendChannel[StreamEvent], scope: trio.CancelScope) -> None:
        """Forward events to `out` until the request ends, the consumer closes `scope`, or the
        deadline passes. Always leaves the executor clean."""
        finished = False
        try:
            with scope, out, self._events:
                with trio.move_on_at(self._deadline.at) as timer:
                    finished = await self._pump(out)
                if timer.cancelled_caught:
                    self._scheduler.metrics.timed_out()
                    out.send_nowait(
                        Failed(
                            message=self._deadline.message(),
                            kind="timeout_error",
                            status=504,
                        )
                    )
        except (trio.BrokenResourceError, trio.WouldBlock):
            pass  # the consumer is gone or not reading: nothing left to tell it
        finally:
            if not finished:
                self._scheduler.abort(self.request.request_id)

    async def _pump(self, out: trio.MemorySendChannel[StreamEvent]) -> bool:
        async for event in self._events:
            if isinstance(event, TokenOut):
                if self.first_token_at is None:
                    self.first_token_at = trio.current_time()
                self.completion_tokens += 1
                text, stop = self._stops.feed(self._detok.add(event.token_id))
                logprobs = self._logprobs(event)
                await self._send_text(out, text, logprobs, final=stop is not None)
                if stop is not None:
                    self._scheduler.abort(self.request.request_id)
                    await out.send(
                        Finished(finish_reason="stop", usage=self._usage(), stop_sequence=stop)
                    )
                    return True  # already aborted above, before a send that may wait
            elif isinstance(event, PrefillProgress):
                self.cached_tokens = max(self.cached_tokens, event.cached)
                with contextlib.suppress(trio.WouldBlock):
                    out.send_nowait(Heartbeat())  # keepalives never wait on a slow reader
            elif isinstance(event, SequenceFinished):
                # Count EOS / stop tokens too: they were generated.
                self.completion_tokens = event.completion_tokens
                self.cached_tokens = event.cached_tokens
                tail, stop = self._stops.feed(self._detok.flush())
                tail += "" if stop is not None else self._stops.flush()
                await self._send_text(out, tail, (), final=True)
                reason: FinishReason = "stop" if stop is not None else event.finish_reason
                await out.send(
                    Finished(finish_reason=reason, usage=self._usage(), stop_sequence=stop)
                )
                return True
            elif isinstance(event, SequenceFailed):
                await out.send(Failed(message=event.message, kind=event.kind, status=event.status))
                return True
        # The scheduler closed the channel without a final event (shutting down).
        await out.send(
            Failed(message="the server is shutting down", kind="overloaded_error", status=503)
        )
        return True

    async def _send_text(
        self,
        out: trio.MemorySendChannel[StreamEvent],
        text: str,
        logprobs: tuple[TokenLogprob, ...],
        *,
        final: bool,
    ) -> None:
        """Send new text, through the tool-call / reasoning parser when there is one (its
        events replace the text; the logprobs still go out, on an empty text delta)."""
        if self._output is None:
            if text or logprobs:
                await out.send(TextDelta(text=text, logprobs=logprobs))
            return
        events = self._output.feed(text)
        if final:
            events.extend(self._output.finish())
        for ev in events:
            await out.send(ev)
        if logprobs:
            await out.send(TextDelta(text="", logprobs=logprobs))

    def _logprobs(self, event: TokenOut) -> tuple[TokenLogprob, ...]:
        if event.logprob is None:
            return ()
        tok = self._tokenizer
        top = tuple(
            (tok.decode([t.token_id], skip_special_tokens=False), t.token_id, t.logprob)
            for t in event.top_logprobs
        )
        return (
            TokenLogprob(
                token=tok.decode([event.token_id], skip_special_tokens=False),
                token_id=event.token_id,
                logprob=event.logprob,
                top=top,
            ),
        )
