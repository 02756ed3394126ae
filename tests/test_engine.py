"""The batch engine against mlx-lm's own generation, on tiny random-weight models."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache

from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import load
from mlx_server.messages import (
    Admit,
    CachedPrefix,
    GenerationRequest,
    SamplingParams,
    SequenceFinished,
    TokenOut,
)
from mlx_server.testing.tiny import build_tiny_model

TOPICS = ["cats", "dogs", "the sea and the sky", "x", "prime numbers 1 2 3", "a", "bb", "ccc"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path, "llama")
    return path


def reference(model, prompt: list[int], n: int, eos: set[int] | None = None) -> list[int]:
    out: list[int] = []
    for tok, _ in generate_step(
        mx.array(prompt), model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1)
    ):
        out.append(int(tok))
        if eos and int(tok) in eos:
            break
    return out


def run(
    engine: BatchEngine, admits: list[Admit]
) -> tuple[dict[str, list[int]], dict[str, SequenceFinished]]:
    tokens: dict[str, list[int]] = {a.request.request_id: [] for a in admits}
    done: dict[str, SequenceFinished] = {}
    for a in admits:
        engine.admit(a)
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                done[ev.request_id] = ev
    return tokens, done


def greedy(rid: str, prompt: list[int], n: int) -> Admit:
    return Admit(
        request=GenerationRequest(
            request_id=rid,
            prompt_ids=tuple(prompt),
            sampling=SamplingParams(temperature=0.0),
            max_tokens=n,
            ignore_eos=True,
        )
    )


@pytest.mark.slow  # runs long: several seconds of CPU
def test_batched_greedy_equals_mlx_lm(tiny_llama: Path) -> None:
    ref_model, ref_tok = mlx_lm.load(str(tiny_llama))
    prompts = [
        ref_tok.apply_chat_template(
            [{"role": "user", "content": f"Tell me about {t}"}], add_generation_prompt=True
        )
        for t in TOPICS
    ]
    expected = [reference(ref_model, p, 20) for p in prompts]

    loaded = load(str(tiny_llama))
    # Our own template and tokenizer build the same prompts as mlx-lm's.
    ours = [
        loaded.tokenizer.encode(
            loaded.template.render([{"role": "user", "content": f"Tell me about {t}"}])
        )
        for t in TOPICS
    ]
    assert ours == prompts

    # Small prefill chunks so prompts are read over several steps while others decode.
    engine = BatchEngine(
        loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size, prefill_chunk=7
    )
    tokens, done = run(engine, [greedy(str(i), p, 20) for i, p in enumerate(prompts)])
    for i in range(len(prompts)):
        assert tokens[str(i)] == expected[i], f"prompt {i} diverged"
        assert done[str(i)].finish_reason == "length"
        assert done[str(i)].completion_tokens == 20
    assert not engine.running and engine.batch_cache is None

    # One at a time gives the same as all at once.
    for i, p in enumerate(prompts[:3]):
        alone, _ = run(engine, [greedy(f"alone{i}", p, 20)])
        assert alone[f"alone{i}"] == expected[i]


def test_prefix_reuse_gives_same_tokens(tiny_llama: Path) -> None:
    loaded = load(str(tiny_llama))
    engine = BatchEngine(
        loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size, prefill_chunk=16
    )
    prompt = loaded.tokenizer.encode(
        loaded.template.render([{"role": "user", "content": "Hello there, how are you?"}])
    )
    first, done = run(engine, [greedy("a", prompt, 8)])
    stored = done["a"].stored
    # Decoding runs one pass ahead, so the stored state holds the last token too.
    assert stored is not None and stored.token_ids == (*prompt, *first["a"])
    # A follow-up turn that extends the first conversation reuses its KV state.
    longer = [*prompt, *first["a"], 198, 42, 43]
    fresh, _ = run(engine, [greedy("fresh", longer, 8)])
    reused, done2 = run(
        engine,
        [
            Admit(
                request=greedy("b", longer, 8).request,
                prefix=CachedPrefix(handle=stored.handle, length=len(stored.token_ids)),
            )
        ],
    )
    assert done2["b"].cached_tokens == len(stored.token_ids)
    assert reused["b"] == fresh["fresh"]


def test_eos_and_stop_tokens_end_generation(tiny_llama: Path) -> None:
    loaded = load(str(tiny_llama))
    prompt = loaded.tokenizer.encode("Once upon a time")
    engine = BatchEngine(loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size)
    free, _ = run(engine, [greedy("free", prompt, 6)])
    stop_at = free["free"][2]
    req = GenerationRequest(
        request_id="s",
        prompt_ids=tuple(prompt),
        sampling=SamplingParams(temperature=0.0),
        max_tokens=6,
        stop_token_ids=(stop_at,),
    )
    tokens, done = run(engine, [Admit(request=req)])
    first_hit = free["free"].index(stop_at)
    assert tokens["s"] == free["free"][:first_hit]  # the stop token itself is not shown
    assert done["s"].finish_reason == "stop"
    assert done["s"].completion_tokens == first_hit + 1


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama: Path) -> None:
    loaded = load(str(tiny_llama))
    engine = BatchEngine(loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size)
    prompt = tuple(loaded.tokenizer.encode("The weather today"))

    def seeded(rid: str, seed: int) -> Admit:
        return Admit(
            request=GenerationRequest(
                request_id=rid,
                prompt_ids=prompt,
                max_tokens=12,
                sampling=SamplingParams(temperature=1.5, top_p=0.95, top_k=50, seed=seed),
            )
        )

    alone, _ = run(engine, [seeded("a", 7)])
    together, _ = run(engine, [seeded("b", 7), seeded("c", 8), greedy("d", list(prompt), 12)])
    assert alone["a"] == together["b"]
    assert together["b"] != together["c"]


def test_logit_bias_forces_a_token(tiny_llama: Path) -> None:
    loaded = load(str(tiny_llama))
    engine = BatchEngine(loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size)
    req = GenerationRequest(
        request_id="bias",
        prompt_ids=tuple(loaded.tokenizer.encode("Hi")),
        max_tokens=4,
        sampling=SamplingParams(temperature=0.0, logit_bias=((1234, 100.0),)),
    )
    tokens, _ = run(engine, [Admit(request=req)])
    assert tokens["bias"] == [1234] * 4


def test_unseeded_temperature_rows_are_drawn_together_each_from_its_own_row() -> None:
    from mlx_server.engine.sampling import RowSampler, sample_batch

    vocab = 64
    logits = mx.full((3, vocab), -30.0)
    logits[0, 5] = 0.0  # each row puts (nearly) all its mass on one token
    logits[1, 9] = 0.0
    logits[2, 17] = 0.0
    samplers = [
        RowSampler(SamplingParams(temperature=1.0), vocab),
        RowSampler(SamplingParams(temperature=0.0), vocab),  # greedy, between sampled rows
        RowSampler(SamplingParams(temperature=0.7, top_p=0.9), vocab),  # filtered: one by one
    ]
    for _ in range(20):
        tokens, _ = sample_batch(logits, samplers)
        assert tokens.tolist() == [5, 9, 17]
    # Temperature flattens the draw: two equal tokens both come up.
    flat = mx.zeros((1, vocab))
    flat[0, 2:] = -30.0
    seen = {
        sample_batch(flat, [RowSampler(SamplingParams(temperature=2.0), vocab)])[0].item()
        for _ in range(60)
    }
    assert seen == {0, 1}


def drain(engine: BatchEngine, first: Sequence[object] = ()) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = collections.defaultdict(list)
    events: Sequence[object] = first
    while True:
        for ev in events:
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
        if not engine.has_work:
            return tokens
        events = engine.step()


def test_prompts_arriving_together_are_read_in_one_batch(tiny_llama: Path) -> None:
    """Fresh prompts admitted together are read in one left-padded pass; each row's tokens
    equal what it gets alone, including a row that ends at its first token and rows that join
    a row already decoding."""
    loaded = load(str(tiny_llama))
    vocab = loaded.tokenizer.vocab_size
    prompts = [
        loaded.tokenizer.encode(
            loaded.template.render([{"role": "user", "content": f"Tell me about {t}"}])
        )
        for t in ("cats", "the sea and the sky at dawn", "x", "prime numbers 2 3 5 7 11")
    ]
    alone_engine = BatchEngine(loaded.model, eos_token_ids=[], vocab_size=vocab)
    assert alone_engine.batch_prefill
    alone = [run(alone_engine, [greedy(f"a{i}", p, 12)])[0][f"a{i}"] for i, p in enumerate(prompts)]

    engine = BatchEngine(loaded.model, eos_token_ids=[], vocab_size=vocab)
    limits = (12, 1, 12, 12)
    for i, (p, n) in enumerate(zip(prompts, limits, strict=True)):
        engine.admit(greedy(str(i), p, n))
    events = engine.step()  # one step reads all four prompts
    firsts = [e for e in events if isinstance(e, TokenOut)]
    assert sorted(e.request_id for e in firsts) == ["0", "1", "2", "3"]
    assert not engine.prefilling and len(engine.running) == 3
    tokens = drain(engine, events)
    for i, n in enumerate(limits):
        assert tokens[str(i)] == alone[i][:n], f"prompt {i}"

    # A group joining a row that is already decoding.
    engine.admit(greedy("early", prompts[0], 12))
    early = engine.step()
    for i, p in enumerate(prompts[1:3]):
        engine.admit(greedy(f"late{i}", p, 12))
    tokens = drain(engine, early)
    assert tokens["early"] == alone[0]
    assert tokens["late0"] == alone[1] and tokens["late1"] == alone[2]


def test_caches_that_cannot_merge_decode_one_request_at_a_time(tmp_path: Path) -> None:
    """A model whose caches cannot join a batch (here quantized KV caches, which have no
    `merge`) still serves several requests: one decodes while the others wait, each gives
    mlx-lm's tokens with the same caches, and nothing is kept for prefix reuse."""
    path = tmp_path / "tiny-llama-wide-heads"
    build_tiny_model(path, "llama", num_attention_heads=2, num_key_value_heads=1)
    loaded = load(str(path))
    model: Any = loaded.model
    n_layers = len(model.layers)
    model.make_cache = lambda: [QuantizedKVCache(group_size=32, bits=8) for _ in range(n_layers)]
    engine = BatchEngine(
        loaded.model, eos_token_ids=[], vocab_size=loaded.tokenizer.vocab_size, prefill_chunk=8
    )
    assert not engine.batchable and not engine.can_reuse
    prompts = [
        loaded.tokenizer.encode(
            loaded.template.render([{"role": "user", "content": f"Tell me about {t}"}])
        )
        for t in ("cats", "the sea", "x")
    ]
    for i, p in enumerate(prompts):
        engine.admit(greedy(str(i), p, 8))
    tokens: dict[str, list[int]] = collections.defaultdict(list)
    widest = 0
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
            assert not (isinstance(ev, SequenceFinished) and ev.stored is not None)
        widest = max(widest, len(engine.running))
    assert widest == 1
    for i, p in enumerate(prompts):
        want = [
            int(t)
            for t, _ in generate_step(
                mx.array(p),
                model,
                max_tokens=8,
                sampler=lambda lp: mx.argmax(lp, axis=-1),
                prompt_cache=model.make_cache(),
            )
        ]
        assert tokens[str(i)] == want, f"prompt {i}"
