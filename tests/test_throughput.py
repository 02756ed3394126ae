"""Throughput at scale (issue 18), checked by what the scheduler and the engine record, never by
wall time: a burst of arrivals is one admission round and starts decoding in one engine step;
rows already decoding keep getting a token every step while a burst is read; the batch size
and prompt budget that `auto` picks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from mlx_server.actors.cache import CacheManager
from mlx_server.actors.scheduler import Scheduler
from mlx_server.config import load_settings
from mlx_server.engine import memory
from mlx_server.messages import (
    Admit,
    CachedPrefix,
    GenerationRequest,
    PrefillProgress,
    SamplingParams,
    SequenceFinished,
    TokenOut,
)
from mlx_server.testing.fakes import FakeExecutor

LLAMA_8B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 131072,
}


def request(rid: str, prompt: list[int], max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_ids=tuple(prompt),
        sampling=SamplingParams(temperature=0.0),
        max_tokens=max_tokens,
        ignore_eos=True,
    )


# -- the scheduler: one admission round per burst ------------------------------------------------


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
async def test_burst_is_one_admission_round(cache_bytes: int) -> None:
    fake = FakeExecutor()
    cache = CacheManager(cache_bytes, fake.send)
    scheduler = Scheduler(fake.send, cache, max_running=64, max_waiting=64)
    fake.on_output = scheduler.on_executor_output
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.serve)
        await nursery.start(scheduler.serve)
        first = scheduler.submit(request("first", [1, 2, 3]))
        await wait_all_tasks_blocked()
        # 32 requests arrive while the first one runs: one round, all 32 admitted in it.
        channels = [scheduler.submit(request(f"r{i}", [1, 2, 3, i])) for i in range(32)]
        await wait_all_tasks_blocked()
        rounds = {a.request_id: a.round for a in scheduler.admissions}
        assert rounds["first"] == 1
        assert {rounds[f"r{i}"] for i in range(32)} == {2}
        assert scheduler.rounds == 2
        assert fake.admitted_ids == ["first", *(f"r{i}" for i in range(32))]
        # The timeline: admitted, first chunk read and first token, in that order.
        fake.progress("r0", 4)
        fake.emit_tokens({"r0": 7})
        await wait_all_tasks_blocked()
        r0 = next(a for a in scheduler.admissions if a.request_id == "r0")
        assert r0.admitted_at is not None and r0.prefill_at is not None
        assert r0.submitted_at <= r0.admitted_at <= r0.prefill_at
        assert r0.first_token_at is not None and r0.prefill_at <= r0.first_token_at
        for ch in [first, *channels]:
            ch.close()
        nursery.cancel_scope.cancel()


async def test_burst_over_max_running_waits_for_a_later_round() -> None:
    fake = FakeExecutor()
    cache = CacheManager(0, fake.send)
    scheduler = Scheduler(fake.send, cache, max_running=4, max_waiting=8)
    fake.on_output = scheduler.on_executor_output
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.serve)
        await nursery.start(scheduler.serve)
        channels = [scheduler.submit(request(f"r{i}", [1, 2, i])) for i in range(6)]
        await wait_all_tasks_blocked()
        assert fake.admitted_ids == ["r0", "r1", "r2", "r3"]
        fake.finish("r0")
        fake.finish("r1")
        await wait_all_tasks_blocked()
        assert fake.admitted_ids[4:] == ["r4", "r5"]
        assert {a.round for a in scheduler.admissions if a.request_id in ("r4", "r5")} == {2}
        for ch in channels:
            ch.close()
        nursery.cancel_scope.cancel()


# -- the engine: a burst starts in one step, decoding rows keep going ------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlx_server.testing.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path, "llama")
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path):
    from mlx_server.engine.model import load

    return load(str(tiny_model_dir))


def engine_for(loaded, prefill_chunk: int):
    from mlx_server.engine.batch import BatchEngine

    return BatchEngine(
        loaded.model,
        eos_token_ids=[],
        vocab_size=loaded.tokenizer.vocab_size,
        prefill_chunk=prefill_chunk,
        keep_caches=False,
    )


def chat_prompt(i: int) -> list[int]:
    """A short chat's length (about 40 tokens), each prompt different."""
    return [(7 * i + j) % 200 + 1 for j in range(36 + i % 9)]


def test_burst_of_32_starts_in_one_step(tiny_model) -> None:
    engine = engine_for(tiny_model, prefill_chunk=512)  # the CPU's budget
    prompts = [chat_prompt(i) for i in range(32)]
    assert sum(map(len, prompts)) > 512  # more than one step's budget while rows decode
    for i, p in enumerate(prompts):
        engine.admit(Admit(request=request(f"r{i}", p)))
    events = engine.step()
    started = {e.request_id for e in events if isinstance(e, TokenOut)}
    assert started == {f"r{i}" for i in range(32)}
    assert len(engine.running) == 32 and not engine.prefilling


def test_burst_does_not_stall_decoding_rows(tiny_model) -> None:
    engine = engine_for(tiny_model, prefill_chunk=128)
    engine.admit(Admit(request=request("busy", chat_prompt(99), max_tokens=64)))
    assert any(isinstance(e, TokenOut) for e in engine.step())
    for i in range(16):
        engine.admit(Admit(request=request(f"r{i}", chat_prompt(i), max_tokens=64)))
    read_per_step: list[int] = []
    done: dict[str, int] = {}
    while engine.prefilling:
        events = engine.step()
        # The decoding row gets its token in every step the burst is read in...
        assert any(isinstance(e, TokenOut) and e.request_id == "busy" for e in events)
        # ...and no step reads more of the burst's prompts than the budget.
        read = 0
        for e in events:
            if isinstance(e, PrefillProgress):
                read += e.done - done.get(e.request_id, 0)
                done[e.request_id] = e.done
        read_per_step.append(read)
    assert all(0 < n <= 128 for n in read_per_step)
    assert sum(read_per_step) == sum(len(chat_prompt(i)) for i in range(16))
    assert len(engine.running) == 17


# -- batch size and prompt budget from the device ------------------------------------------------


def test_kv_bytes_per_token_from_config() -> None:
    per_token, fixed = memory.kv_bytes(LLAMA_8B)
    assert per_token == 32 * 8 * 128 * 2 * 2 and fixed == 0
    # gemma-style: one global layer in 6, the rest a 1024-token window.
    gemma = {**LLAMA_8B, "sliding_window": 1024, "sliding_window_pattern": 6, "head_dim": 128}
    per_token, fixed = memory.kv_bytes(gemma, dtype_bytes=2)
    row = 8 * 128 * 2 * 2
    assert per_token == 5 * row and fixed == 27 * 1024 * row
    hybrid = {**LLAMA_8B, "full_attention_interval": 4, "linear_num_value_heads": 32}
    per_token, fixed = memory.kv_bytes(hybrid)
    assert per_token == 8 * row and fixed > 0
    assert memory.kv_bytes({**LLAMA_8B, "text_config": {"num_hidden_layers": 2}})[0] == 2 * row


def test_auto_batch_size() -> None:
    gib = 1 << 30
    # An 8B llama on a 141 GB GPU: 128 KiB a token, 512 MiB a 4096-token stream.
    assert memory.auto_batch_size(LLAMA_8B, 130 * gib) == memory.AUTO_BATCH_MAX
    assert memory.auto_batch_size(LLAMA_8B, 40 * gib) == math.floor(40 * 0.6 * 2)
    assert memory.auto_batch_size(LLAMA_8B, 1 * gib) == memory.AUTO_BATCH_MIN
    assert memory.auto_batch_size(LLAMA_8B, None) == 32
    # float32 caches take twice the room; an 8-bit cache (group 64) about 0.53x.
    assert memory.auto_batch_size(LLAMA_8B, 40 * gib, dtype_bytes=4) == 24
    assert memory.auto_batch_size(LLAMA_8B, 40 * gib, kv_bits=8) == 90
    assert memory.auto_batch_size(LLAMA_8B, 20 * gib, kv_bits=4) == 85


def test_auto_flags() -> None:
    assert load_settings([], {}).max_batch_size == 0
    assert load_settings(["--max-batch-size", "auto"], {}).max_batch_size == 0
    assert load_settings(["--max-batch-size", "96"], {}).max_batch_size == 96
    assert load_settings([], {"MLX_SERVER_PREFILL_CHUNK": "AUTO"}).prefill_chunk == 0
    assert load_settings(["--prefill-chunk", "1024"], {}).prefill_chunk == 1024
    with pytest.raises(SystemExit):
        load_settings(["--max-batch-size", "0"], {})
    assert memory.prefill_budget() in (512, 2048)


# -- end to end: a burst of 64 streams, default (auto) settings ------------------------------------


@pytest.mark.slow
async def test_burst_of_64_streams_all_complete(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """64 streaming chats sent at once to a server with the default (auto) batch size: every
    connection ends with its last chunk and [DONE], every stream with all its tokens."""
    import httpx

    from mlx_server.testing.server import run_server

    log = tmp_path_factory.mktemp("srv") / "server.log"
    with run_server(["--model", str(tiny_model_dir)], log_path=log) as server:
        assert "max batch size" in server.log()
        results: dict[int, tuple[int, str | None, bool]] = {}

        async def one(client: httpx.AsyncClient, i: int) -> None:
            body = {
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": f"Tell me about item {i}"}],
                "max_tokens": 12,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            tokens, reason, done = 0, None, False
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        reason = choice.get("finish_reason") or reason
            results[i] = (tokens, reason, done)

        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as c:
            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(one, c, i)
        assert results == {i: (12, "length", True) for i in range(64)}


def test_burst_of_short_cached_prompts_is_read_in_one_batch(tiny_model) -> None:
    """A burst of short chats whose openings are cached (the same chat sent again, say) is read
    in one batched pass, not one pass per request from its cached prefix."""
    from mlx_server.engine.batch import BatchEngine

    engine = BatchEngine(
        tiny_model.model,
        eos_token_ids=[],
        vocab_size=tiny_model.tokenizer.vocab_size,
        prefill_chunk=512,
        keep_caches=True,
    )
    opening = chat_prompt(1)[:30]
    engine.admit(Admit(request=request("first", opening, max_tokens=2)))
    stored = None
    while engine.has_work:
        for e in engine.step():
            if isinstance(e, SequenceFinished):
                stored = e.stored
    assert stored is not None
    prefix = CachedPrefix(handle=stored.handle, length=30)
    for i in range(32):
        progress = engine.admit(
            Admit(request=request(f"r{i}", [*opening, *range(i + 1, i + 9)]), prefix=prefix)
        )
        assert progress.cached == 30  # reusable, and more than half of each prompt
    events = engine.step()
    started = {e.request_id for e in events if isinstance(e, TokenOut)}
    assert started == {f"r{i}" for i in range(32)}
    reads = [e for e in events if isinstance(e, PrefillProgress)]
    # One batch reads every prompt whole (a pass per request would start at the cached 30).
    assert [(e.done, e.total, e.cached) for e in reads] == [(38, 38, 0)] * 32


async def test_a_burst_admitted_in_one_turn_reaches_the_scheduler_as_one_message(
    tiny_model,
) -> None:
    """The executor drains a burst's admissions in one turn and sends what they produce with
    that turn's step: one message for the burst, not one per request."""
    from mlx_server.actors.executor import MLX_TURNS, Executor
    from mlx_server.messages import StepOutput

    outputs: list[StepOutput] = []
    n = 8
    finished = trio.Event()

    def on_output(out: StepOutput) -> None:
        outputs.append(out)
        if sum(isinstance(e, SequenceFinished) for o in outputs for e in o.events) == n:
            finished.set()

    executor = Executor(lambda: tiny_model, on_output=on_output, keep_caches=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.serve)
        # Holding the executor's turn while the burst is queued: its thread takes them all
        # in its next turn.
        with MLX_TURNS:
            for i in range(n):
                executor.send(Admit(request=request(str(i), chat_prompt(i), max_tokens=3)))
        with trio.fail_after(60):
            await finished.wait()
        nursery.cancel_scope.cancel()
    first = outputs[0].events
    admitted = {e.request_id for e in first if isinstance(e, PrefillProgress)}
    assert admitted == {str(i) for i in range(n)}
    # The same message carries the step that read the burst: every row's first token.
    assert {e.request_id for e in first if isinstance(e, TokenOut)} == admitted
