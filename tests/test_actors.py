"""The actors (scheduler, cache manager, stream) driven by a FakeExecutor, deterministically:
every wait is `wait_all_tasks_blocked` or trio's mock clock, never a sleep."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from mlx_server.actors.cache import CacheManager
from mlx_server.actors.frontend import Frontend, StreamHandle
from mlx_server.actors.scheduler import Scheduler
from mlx_server.engine.tokenizer import Tokenizer
from mlx_server.errors import InvalidRequest, Overloaded
from mlx_server.messages import (
    Abort,
    CachedPrefix,
    ChatMessage,
    Failed,
    Finished,
    GenerationRequest,
    Heartbeat,
    PrefillProgress,
    PromptSpec,
    ReleaseCache,
    SamplingParams,
    SequenceFailed,
    SequenceFinished,
    StreamEvent,
    TextDelta,
    TokenOut,
    TopLogprob,
)
from mlx_server.testing.fakes import FakeExecutor, fake_loaded_model, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
(EOS,) = TOKENIZER.eos_token_ids


def make_request(
    rid: str,
    prompt: tuple[int, ...] = (1, 2, 3),
    *,
    max_tokens: int = 100,
    stop: tuple[str, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
    logprobs: bool = False,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_ids=prompt,
        sampling=SamplingParams(temperature=0.0, logprobs=logprobs),
        max_tokens=max_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
    )


def drain(channel: trio.MemoryReceiveChannel[Any]) -> tuple[list[Any], bool]:
    """Everything the channel holds right now, and whether it has ended."""
    events: list[Any] = []
    while True:
        try:
            events.append(channel.receive_nowait())
        except trio.WouldBlock:
            return events, False
        except trio.EndOfChannel:
            return events, True


@attrs.define(eq=False)
class Actors:
    fake: FakeExecutor
    cache: CacheManager
    scheduler: Scheduler
    frontend: Frontend
    tokenizer: Tokenizer
    scheduler_scope: trio.CancelScope

    async def settle(self) -> None:
        await wait_all_tasks_blocked()


@asynccontextmanager
async def open_actors(
    *,
    max_running: int = 2,
    max_waiting: int = 2,
    cache_bytes: int = 0,
    stream_timeout: float = math.inf,
    bytes_per_token: int = 100,
) -> AsyncIterator[Actors]:
    """The runtime's wiring, with a FakeExecutor in place of the executor thread."""
    fake = FakeExecutor(eos_token_ids=TOKENIZER.eos_token_ids, bytes_per_token=bytes_per_token)
    cache = CacheManager(cache_bytes, fake.send)
    scheduler = Scheduler(fake.send, cache, max_running=max_running, max_waiting=max_waiting)
    fake.on_output = scheduler.on_executor_output
    scheduler_scope = trio.CancelScope()

    async def serve_scheduler(*, task_status: trio.TaskStatus[None]) -> None:
        with scheduler_scope:
            await scheduler.serve(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(cache.serve)
        await nursery.start(serve_scheduler)
        frontend = Frontend(
            fake_loaded_model(TOKENIZER),
            scheduler,
            nursery,
            timeout=stream_timeout,
            default_max_tokens=16,
        )
        yield Actors(
            fake=fake,
            cache=cache,
            scheduler=scheduler,
            frontend=frontend,
            tokenizer=TOKENIZER,
            scheduler_scope=scheduler_scope,
        )
        nursery.cancel_scope.cancel()


def texts(events: list[StreamEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def without_heartbeats(events: list[StreamEvent]) -> list[StreamEvent]:
    return [e for e in events if not isinstance(e, Heartbeat)]


# --------------------------------------------------------------------------------------------
# Scheduler: admission and the queue bound
# --------------------------------------------------------------------------------------------


async def test_admits_up_to_max_running_and_queues_the_rest() -> None:
    async with open_actors(max_running=2, max_waiting=2) as a:
        channels = {rid: a.scheduler.submit(make_request(rid)) for rid in "abcd"}
        await a.settle()
        assert a.fake.admitted_ids == ["a", "b"]
        assert (a.scheduler.running, a.scheduler.waiting) == (2, 2)

        a.fake.finish("a")
        await a.settle()
        assert a.fake.admitted_ids == ["a", "b", "c"]  # first come, first served
        assert (a.scheduler.running, a.scheduler.waiting) == (2, 1)

        a.fake.fail("b")  # a failure frees a slot too
        await a.settle()
        assert a.fake.admitted_ids == ["a", "b", "c", "d"]
        assert (a.scheduler.running, a.scheduler.waiting) == (2, 0)
        assert drain(channels["a"])[1]
        assert drain(channels["b"])[1]


async def test_submit_beyond_capacity_is_overloaded() -> None:
    async with open_actors(max_running=1, max_waiting=1) as a:
        a.scheduler.submit(make_request("a"))
        a.scheduler.submit(make_request("b"))
        with pytest.raises(Overloaded) as info:
            a.scheduler.submit(make_request("c"))
        assert info.value.status == 429
        await a.settle()
        assert a.fake.admitted_ids == ["a"]  # the refused request went nowhere

        a.fake.finish("a")
        await a.settle()
        a.scheduler.submit(make_request("c"))  # room again
        await a.settle()
        assert a.fake.admitted_ids == ["a", "b"]
        assert (a.scheduler.running, a.scheduler.waiting) == (1, 1)


async def test_overloaded_counts_requests_not_yet_seen_by_the_scheduler() -> None:
    async with open_actors(max_running=1, max_waiting=0) as a:
        a.scheduler.submit(make_request("a"))
        # No checkpoint: the scheduler has not even read the first submit yet.
        with pytest.raises(Overloaded):
            a.scheduler.submit(make_request("b"))


# --------------------------------------------------------------------------------------------
# Scheduler: routing events
# --------------------------------------------------------------------------------------------


async def test_events_are_routed_to_their_request_in_order() -> None:
    async with open_actors(max_running=2) as a:
        ch_a = a.scheduler.submit(make_request("a", (1, 2, 3)))
        ch_b = a.scheduler.submit(make_request("b", (4, 5)))
        await a.settle()
        a.fake.emit_tokens({"a": 10, "b": 20})
        a.fake.emit_tokens({"b": 21})
        a.fake.emit_tokens({"a": [11, 12], "b": 22})
        a.fake.finish("b", "length", store=False)
        await a.settle()

        events_a, ended_a = drain(ch_a)
        events_b, ended_b = drain(ch_b)
        assert events_a[0] == PrefillProgress(request_id="a", done=0, total=3, cached=0)
        assert [e.token_id for e in events_a[1:]] == [10, 11, 12]
        assert all(isinstance(e, TokenOut) and e.request_id == "a" for e in events_a[1:])
        assert not ended_a

        assert events_b[0] == PrefillProgress(request_id="b", done=0, total=2, cached=0)
        assert [e.token_id for e in events_b[1:-1]] == [20, 21, 22]
        assert events_b[-1] == SequenceFinished(
            request_id="b",
            finish_reason="length",
            prompt_tokens=2,
            cached_tokens=0,
            completion_tokens=3,
        )
        assert ended_b  # a finished request's channel ends
        assert a.scheduler.running == 1
        assert a.scheduler.last_batch_size == 1


async def test_a_failed_request_gets_sequence_failed_and_its_channel_ends() -> None:
    async with open_actors() as a:
        ch = a.scheduler.submit(make_request("a"))
        await a.settle()
        a.fake.fail("a", "out of memory")
        await a.settle()
        events, ended = drain(ch)
        assert events[-1] == SequenceFailed(request_id="a", message="out of memory")
        assert ended
        assert a.scheduler.running == 0


async def test_events_for_unknown_requests_are_ignored() -> None:
    async with open_actors() as a:
        ch = a.scheduler.submit(make_request("a"))
        await a.settle()
        a.fake.step(TokenOut(request_id="ghost", token_id=1), TokenOut(request_id="a", token_id=2))
        await a.settle()
        events, ended = drain(ch)
        assert [e.token_id for e in events if isinstance(e, TokenOut)] == [2]
        assert not ended
        assert a.fake.aborted_ids == []


async def test_scheduler_exit_ends_every_channel() -> None:
    async with open_actors(max_running=1, max_waiting=1) as a:
        running = a.scheduler.submit(make_request("a"))
        waiting = a.scheduler.submit(make_request("b"))
        await a.settle()
        a.scheduler_scope.cancel()
        await a.settle()
        assert drain(running)[1]
        assert drain(waiting)[1]


# --------------------------------------------------------------------------------------------
# Scheduler: aborts
# --------------------------------------------------------------------------------------------


async def test_aborting_a_waiting_request_never_reaches_the_executor() -> None:
    async with open_actors(max_running=1, max_waiting=2) as a:
        a.scheduler.submit(make_request("a"))
        ch_b = a.scheduler.submit(make_request("b", (1, 2, 3, 4)))
        a.scheduler.submit(make_request("c"))
        await a.settle()
        a.scheduler.abort("b")
        await a.settle()
        events, ended = drain(ch_b)
        assert events == [
            SequenceFinished(
                request_id="b",
                finish_reason="abort",
                prompt_tokens=4,
                cached_tokens=0,
                completion_tokens=0,
            )
        ]
        assert ended
        assert a.scheduler.waiting == 1

        a.fake.finish("a")
        await a.settle()
        assert a.fake.admitted_ids == ["a", "c"]
        assert a.fake.aborted_ids == []
        # The freed queue slot is usable again.
        a.scheduler.submit(make_request("d"))
        a.scheduler.submit(make_request("e"))
        with pytest.raises(Overloaded):
            a.scheduler.submit(make_request("f"))


async def test_aborting_a_running_request_aborts_it_in_the_executor() -> None:
    async with open_actors() as a:
        ch = a.scheduler.submit(make_request("a", (1, 2, 3)))
        await a.settle()
        a.fake.emit_tokens({"a": [7, 8]})
        a.scheduler.abort("a")
        await a.settle()
        assert a.fake.commands[-1] == Abort(request_id="a")
        events, ended = drain(ch)
        assert events[-1] == SequenceFinished(
            request_id="a",
            finish_reason="abort",
            prompt_tokens=3,
            cached_tokens=0,
            completion_tokens=2,
        )
        assert ended
        assert a.scheduler.running == 0
        assert a.fake.running_ids == []


async def test_aborting_a_finished_or_unknown_request_is_a_no_op() -> None:
    async with open_actors() as a:
        a.scheduler.submit(make_request("a"))
        await a.settle()
        a.fake.finish("a")
        await a.settle()
        a.scheduler.abort("a")
        a.scheduler.abort("nobody")
        await a.settle()
        assert a.fake.aborted_ids == []


async def test_a_closed_consumer_channel_aborts_at_the_next_event() -> None:
    async with open_actors() as a:
        ch = a.scheduler.submit(make_request("a"))
        other = a.scheduler.submit(make_request("b"))
        await a.settle()
        ch.close()  # the stream actor went away without saying so
        await a.settle()
        assert a.fake.aborted_ids == []  # nothing happens until there is something to deliver
        a.fake.emit_tokens({"a": 5, "b": 6})
        await a.settle()
        assert a.fake.aborted_ids == ["a"]
        assert a.fake.running_ids == ["b"]
        assert a.scheduler.running == 1
        events, ended = drain(other)
        assert [e.token_id for e in events if isinstance(e, TokenOut)] == [6]
        assert not ended


# --------------------------------------------------------------------------------------------
# Cache manager
# --------------------------------------------------------------------------------------------


async def test_a_stored_cache_is_reused_by_a_later_request_with_the_same_prefix() -> None:
    async with open_actors(max_running=1, cache_bytes=10_000) as a:
        ch = a.scheduler.submit(make_request("a", (1, 2, 3, 4)))
        await a.settle()
        assert a.fake.admits[0].prefix is None  # nothing cached yet
        a.fake.emit_tokens({"a": [7, 8]})
        output = a.fake.finish("a")
        await a.settle()
        finished = output.events[0]
        assert isinstance(finished, SequenceFinished)
        assert finished.stored is not None
        assert finished.stored.token_ids == (1, 2, 3, 4, 7)
        assert drain(ch)[0][-1] == finished
        assert a.cache.used_bytes == finished.stored.nbytes
        handle = finished.stored.handle

        # The next turn of the conversation extends the cached tokens.
        ch_b = a.scheduler.submit(make_request("b", (1, 2, 3, 4, 7, 8, 9)))
        await a.settle()
        assert a.fake.admits[-1].prefix == CachedPrefix(handle=handle, length=5)
        assert drain(ch_b)[0] == [PrefillProgress(request_id="b", done=5, total=7, cached=5)]
        a.fake.finish("b", store=False)
        await a.settle()

        # A prompt equal to the cached tokens reuses all but its last token.
        a.scheduler.submit(make_request("c", (1, 2, 3, 4, 7)))
        await a.settle()
        assert a.fake.admits[-1].prefix == CachedPrefix(handle=handle, length=4)
        a.fake.finish("c", store=False)
        await a.settle()

        # A prompt sharing only a part of it reuses that part.
        a.scheduler.submit(make_request("d", (1, 2, 9)))
        await a.settle()
        assert a.fake.admits[-1].prefix == CachedPrefix(handle=handle, length=2)
        a.fake.finish("d", store=False)
        await a.settle()

        a.scheduler.submit(make_request("e", (5, 1, 2, 3)))
        await a.settle()
        assert a.fake.admits[-1].prefix is None
        assert (a.cache.lookups, a.cache.hits) == (5, 3)


async def test_no_lookup_when_the_cache_is_disabled() -> None:
    async with open_actors(cache_bytes=0) as a:
        a.scheduler.submit(make_request("a", (1, 2, 3)))
        await a.settle()
        output = a.fake.finish("a")
        await a.settle()
        finished = output.events[0]
        assert isinstance(finished, SequenceFinished) and finished.stored is not None
        # Nothing can be kept: the executor is told to free it at once.
        assert a.fake.released_handles == [finished.stored.handle]
        a.scheduler.submit(make_request("b", (1, 2, 3)))
        await a.settle()
        assert a.fake.admits[-1].prefix is None
        assert a.cache.lookups == 0


async def test_evictions_over_the_budget_release_caches_in_the_executor() -> None:
    # 100 bytes a token: each stored entry below is 400 bytes; two fit in 1000.
    async with open_actors(max_running=3, cache_bytes=1000, bytes_per_token=100) as a:
        for rid, prompt in [("a", (1, 1, 1)), ("b", (2, 2, 2)), ("c", (3, 3, 3))]:
            a.scheduler.submit(make_request(rid, prompt))
        await a.settle()
        a.fake.emit_tokens({"a": 9, "b": 9, "c": 9})
        handles = {}
        for rid in "abc":
            stored = a.fake.finish(rid, "length").events[0]
            assert isinstance(stored, SequenceFinished) and stored.stored is not None
            assert stored.stored.nbytes == 300
            handles[rid] = stored.stored.handle
        await a.settle()
        assert a.fake.released_handles == []  # 900 bytes fit
        assert a.cache.used_bytes == 900

        # Touch "a" so that "b" is the least recently used.
        a.scheduler.submit(make_request("a2", (1, 1, 1, 5)))
        await a.settle()
        assert a.fake.admits[-1].prefix == CachedPrefix(handle=handles["a"], length=3)
        a.fake.emit_tokens({"a2": 9})
        a.fake.finish("a2", store=False)

        a.scheduler.submit(make_request("d", (4, 4, 4)))
        await a.settle()
        a.fake.emit_tokens({"d": 9})
        d = a.fake.finish("d").events[0]
        await a.settle()
        assert isinstance(d, SequenceFinished) and d.stored is not None
        assert a.fake.commands[-1] == ReleaseCache(handles=(handles["b"],))
        assert set(a.fake.stored) == {handles["a"], handles["c"], d.stored.handle}
        assert a.cache.used_bytes == 900

        # An entry bigger than the whole budget is released right away.
        a.scheduler.submit(make_request("big", tuple(range(100, 120))))
        await a.settle()
        big = a.fake.finish("big").events[0]
        await a.settle()
        assert isinstance(big, SequenceFinished) and big.stored is not None
        assert a.fake.commands[-1] == ReleaseCache(handles=(big.stored.handle,))
        assert a.cache.used_bytes == 900


# --------------------------------------------------------------------------------------------
# Stream actor, through Frontend.start_stream
# --------------------------------------------------------------------------------------------


async def test_frontend_prompt_ids_with_the_fake_model() -> None:
    async with open_actors() as a:
        spec = PromptSpec(chat=(ChatMessage(role="user", content="Hello"),))
        ids = await a.frontend.prompt_ids(spec)
        expected = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        assert ids == tuple(a.tokenizer.encode(expected))
        assert await a.frontend.prompt_ids(PromptSpec(token_ids=(1, 2))) == (1, 2)
        with pytest.raises(InvalidRequest):
            await a.frontend.prompt_ids(PromptSpec(token_ids=(a.tokenizer.vocab_size,)))


def read(handle: StreamHandle) -> tuple[list[StreamEvent], bool]:
    return drain(handle.events)


async def test_stream_text_deltas_and_usage() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a", (1, 2, 3, 4)))
        await a.settle()
        events, ended = read(handle)
        assert events == [Heartbeat()]  # the admit's prefill progress
        assert not ended

        a.fake.emit_text(a.tokenizer, {"a": "Hello world"})
        await a.settle()
        events, _ = read(handle)
        assert events == [TextDelta(text="Hello"), TextDelta(text=" world")]

        a.fake.emit_tokens({"a": EOS})  # counted, never shown
        await a.settle()
        events, ended = read(handle)
        assert len(events) == 1
        finished = events[0]
        assert isinstance(finished, Finished)
        assert finished.finish_reason == "stop"
        assert finished.stop_sequence is None
        assert finished.usage.prompt_tokens == 4
        assert finished.usage.completion_tokens == 3
        assert finished.usage.total_tokens == 7
        assert ended
        assert a.fake.aborted_ids == []  # it ended by itself: nothing to abort


async def test_stream_multibyte_characters_are_never_split() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a"))
        await a.settle()
        text = "café 🙂 你好"
        for token in a.tokenizer.encode(text):
            a.fake.emit_tokens({"a": token})
        a.fake.finish("a", "length")
        await a.settle()
        events, ended = read(handle)
        deltas = [e.text for e in events if isinstance(e, TextDelta)]
        assert all("\ufffd" not in d and d for d in deltas)
        assert "".join(deltas) == text
        assert "🙂" in deltas  # released whole, once its fourth byte arrived
        assert isinstance(events[-1], Finished)
        assert events[-1].usage.completion_tokens == len(a.tokenizer.encode(text))
        assert ended


async def test_stream_length_finish_from_max_tokens() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a", max_tokens=2))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"a": "Hello world"})
        await a.settle()
        events = without_heartbeats(read(handle)[0])
        assert texts(events) == "Hello world"
        assert isinstance(events[-1], Finished)
        assert events[-1].finish_reason == "length"
        assert events[-1].usage.completion_tokens == 2


async def test_stream_stop_string_cuts_text_and_aborts() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a", stop=("END",)))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"a": "Hello world! E"})
        await a.settle()
        events = without_heartbeats(read(handle)[0])
        assert texts(events) == "Hello world! "  # "E" is held back: it may start "END"
        assert a.fake.aborted_ids == []

        a.fake.emit_text(a.tokenizer, {"a": "ND and more"})
        await a.settle()
        events, ended = read(handle)
        assert texts(events) == ""
        finished = events[-1]
        assert isinstance(finished, Finished)
        assert finished.finish_reason == "stop"
        assert finished.stop_sequence == "END"
        n = len(a.tokenizer.encode("Hello world! E")) + 2  # up to the token completing "END"
        assert finished.usage.completion_tokens == n
        assert ended
        assert a.fake.aborted_ids == ["a"]  # the executor stopped generating, told once
        assert a.fake.running_ids == []
        assert a.scheduler.running == 0


async def test_stream_stop_string_inside_one_token() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a", stop=(" stop",)))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"a": "Hello world stop the"})
        await a.settle()
        events = without_heartbeats(read(handle)[0])
        assert texts(events) == "Hello world"
        assert isinstance(events[-1], Finished)
        assert events[-1].stop_sequence == " stop"
        assert events[-1].usage.completion_tokens == 3
        assert "a" in a.fake.aborted_ids


async def test_stream_held_back_text_is_released_at_the_end() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a", stop=("END",)))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"a": "Hello EN"})
        a.fake.emit_tokens({"a": EOS})
        await a.settle()
        events = without_heartbeats(read(handle)[0])
        assert texts(events) == "Hello EN"
        assert isinstance(events[-1], Finished)
        assert events[-1].finish_reason == "stop"
        assert events[-1].stop_sequence is None


async def test_stream_logprobs() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a", logprobs=True))
        await a.settle()
        hello, world = a.tokenizer.encode("Hello world")
        a.fake.step(
            TokenOut(
                request_id="a",
                token_id=hello,
                logprob=-0.25,
                top_logprobs=(
                    TopLogprob(token_id=hello, logprob=-0.25),
                    TopLogprob(token_id=world, logprob=-2.0),
                ),
            )
        )
        await a.settle()
        (delta,) = without_heartbeats(read(handle)[0])
        assert isinstance(delta, TextDelta)
        assert delta.text == "Hello"
        (lp,) = delta.logprobs
        assert (lp.token, lp.token_id, lp.logprob) == ("Hello", hello, -0.25)
        assert lp.top == (("Hello", hello, -0.25), (" world", world, -2.0))


async def test_stream_reports_cached_tokens() -> None:
    async with open_actors(max_running=1, cache_bytes=10_000) as a:
        with a.frontend.start_stream(make_request("a", (1, 2, 3, 4))) as first:
            await a.settle()
            a.fake.emit_tokens({"a": EOS})
            await a.settle()
            events = without_heartbeats(drain(first)[0])
            assert isinstance(events[-1], Finished)
            assert events[-1].usage.cached_tokens == 0
        handle = a.frontend.start_stream(make_request("b", (1, 2, 3, 4, 5, 6)))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"b": "Hello"})
        a.fake.finish("b")
        await a.settle()
        events = without_heartbeats(read(handle)[0])
        assert isinstance(events[-1], Finished)
        assert events[-1].usage == attrs.evolve(events[-1].usage, cached_tokens=4)
        assert events[-1].usage.prompt_tokens == 6


async def test_stream_failure() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a"))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"a": "Hello"})
        a.fake.fail("a", "kaput")
        await a.settle()
        events, ended = read(handle)
        events = without_heartbeats(events)
        assert texts(events) == "Hello"
        assert events[-1] == Failed(message="kaput")
        assert ended
        assert a.fake.aborted_ids == []


async def test_stream_scheduler_shutdown_fails_the_stream() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a"))
        await a.settle()
        a.scheduler_scope.cancel()
        await a.settle()
        events, ended = read(handle)
        assert events[-1] == Failed(
            message="the server is shutting down", kind="overloaded_error", status=503
        )
        assert ended


async def test_stream_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actors(stream_timeout=5.0) as a:
        start = trio.current_time()
        handle = a.frontend.start_stream(make_request("a"))
        events = [event async for event in handle.events]  # the executor never emits
        assert trio.current_time() - start == pytest.approx(5.0)
        assert without_heartbeats(events) == [
            Failed(message="request timed out after 5 s", kind="timeout_error", status=504)
        ]
        await a.settle()
        assert a.fake.aborted_ids == ["a"]
        assert a.fake.running_ids == []
        assert a.scheduler.running == 0


async def test_stream_timeout_of_a_waiting_request(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actors(stream_timeout=5.0, max_running=1) as a:
        a.scheduler.submit(make_request("a"))  # holds the only slot, no deadline
        await a.settle()
        handle = a.frontend.start_stream(make_request("b"))  # queued behind "a"
        events = [event async for event in handle.events]
        assert events == [
            Failed(message="request timed out after 5 s", kind="timeout_error", status=504)
        ]
        await a.settle()
        assert (a.scheduler.running, a.scheduler.waiting) == (1, 0)
        a.fake.finish("a")
        await a.settle()
        assert a.fake.admitted_ids == ["a"]  # "b" left the queue without reaching the executor
        assert a.fake.aborted_ids == []


async def test_stream_closing_the_handle_mid_stream_aborts() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a"))
        await a.settle()
        a.fake.emit_text(a.tokenizer, {"a": "Hello"})
        await a.settle()
        assert texts(without_heartbeats(read(handle)[0])) == "Hello"
        handle.close()
        await a.settle()
        assert a.fake.aborted_ids == ["a"]
        assert a.fake.running_ids == []
        assert a.scheduler.running == 0


async def test_stream_closed_before_it_starts_still_aborts() -> None:
    async with open_actors() as a:
        with a.frontend.start_stream(make_request("a")):
            pass  # the response ended before the actor ran at all
        await a.settle()
        assert a.fake.admitted_ids == ["a"]
        assert a.fake.aborted_ids == ["a"]
        assert a.scheduler.running == 0


async def test_stream_consumer_that_stops_reading_is_aborted() -> None:
    async with open_actors() as a:
        handle = a.frontend.start_stream(make_request("a"))
        await a.settle()
        handle.events.close()  # the consumer left without closing the scope
        a.fake.emit_text(a.tokenizer, {"a": "Hello"})
        await a.settle()
        assert a.fake.aborted_ids == ["a"]
        assert a.scheduler.running == 0
