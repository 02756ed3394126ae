"""Quantized KV caches that batch (`engine.kv_quant`, `--kv-bits`).

- the batch engine with 4- and 8-bit caches gives, token for token, what mlx-lm's own
  single-sequence `QuantizedKVCache` gives (`generate_step` with a quantized prompt cache), for
  requests that join one batch at different steps and are read in chunks;
- a finished row's quantized state serves a follow-up turn from the prompt cache (same tokens as
  reading the whole prompt), and its bytes per token are the quantized layout's;
- a group size that does not divide the head dimension turns quantization off with a warning.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

from mlx_server.config import load_settings
from mlx_server.engine.batch import BatchEngine
from mlx_server.messages import (
    Admit,
    CachedPrefix,
    GenerationRequest,
    SamplingParams,
    SequenceFinished,
    TokenOut,
)
from mlx_server.testing.tiny import build_tiny_model

PROMPTS = tuple(tuple(range(100 + i, 140 + 7 * i)) for i in range(4))
N = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    # head_dim 32 (128 / 4 heads), 2 KV heads, 2 layers, float32.
    path = tmp_path_factory.mktemp("q") / "llama"
    m, _ = build_tiny_model(path, "llama", hidden_size=128, intermediate_size=256)
    return m


def engine(model: nn.Module, bits: int, prefill_chunk: int = 512) -> BatchEngine:
    return BatchEngine(
        model,
        eos_token_ids=[],
        vocab_size=49152,
        kv_bits=bits,
        kv_group_size=32,
        prefill_chunk=prefill_chunk,
    )


def admit(rid: str, prompt: tuple[int, ...], prefix: CachedPrefix | None = None) -> Admit:
    request = GenerationRequest(
        request_id=rid,
        prompt_ids=prompt,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=N,
        ignore_eos=True,
    )
    return Admit(request=request, prefix=prefix)


def drive(
    eng: BatchEngine, admits: list[Admit], *, stagger: bool = False
) -> tuple[dict[str, list[int]], dict[str, SequenceFinished]]:
    """Step to the end; with `stagger` each request joins once the previous has 3 tokens."""
    tokens: dict[str, list[int]] = collections.defaultdict(list)
    done: dict[str, SequenceFinished] = {}
    waiting = list(admits)
    eng.admit(waiting.pop(0))
    if not stagger:
        while waiting:
            eng.admit(waiting.pop(0))
    last = admits[0].request.request_id
    while eng.has_work or waiting:
        if waiting and len(tokens[last]) >= 3:
            last = waiting[0].request.request_id
            eng.admit(waiting.pop(0))
        for ev in eng.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_id].append(ev.token_id)
            elif isinstance(ev, SequenceFinished):
                done[ev.request_id] = ev
    return dict(tokens), done


def mlx_lm_quantized(model: nn.Module, prompt: tuple[int, ...], bits: int) -> list[int]:
    cache = [QuantizedKVCache(group_size=32, bits=bits) for _ in make_prompt_cache(model)]
    return [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt),
            model,
            max_tokens=N,
            sampler=lambda lp: mx.argmax(lp, axis=-1),
            prompt_cache=cache,
        )
    ]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_batched_quantized_cache_equals_mlx_lm(model: nn.Module, bits: int) -> None:
    want = [mlx_lm_quantized(model, p, bits) for p in PROMPTS]
    eng = engine(model, bits)
    assert eng.cache_kinds == ("QuantKVCache",)
    together, _ = drive(eng, [admit(str(i), p) for i, p in enumerate(PROMPTS)])
    staggered, _ = drive(
        engine(model, bits, prefill_chunk=16),
        [admit(str(i), p) for i, p in enumerate(PROMPTS)],
        stagger=True,
    )
    for i in range(len(PROMPTS)):
        assert together[str(i)] == want[i], (bits, i)
        assert staggered[str(i)] == want[i], (bits, i, "staggered")


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_state_serves_a_follow_up_turn(model: nn.Module, bits: int) -> None:
    eng = engine(model, bits)
    eng.admit(admit("x", PROMPTS[1]))
    eng.step()  # read the prompt: the cache in use is quantized
    plain = engine(model, 0)
    plain.admit(admit("x", PROMPTS[1]))
    plain.step()
    assert 0 < eng.kv_bytes() < plain.kv_bytes()
    eng.abort("x")
    tokens, done = drive(eng, [admit("a", PROMPTS[0])])
    stored = done["a"].stored
    assert stored is not None and stored.cuttable
    # Bytes against the float32 cache of the same request: per head and position, 32 values
    # at `bits` bits plus a float32 scale and bias per group of 32, against 32 float32 values.
    _, plain = drive(engine(model, 0), [admit("a", PROMPTS[0])])
    plain_stored = plain["a"].stored
    assert plain_stored is not None
    assert stored.nbytes / plain_stored.nbytes == (32 * bits / 8 + 2 * 4) / (32 * 4)
    follow = (*PROMPTS[0], *tokens["a"], 7, 8, 9)
    hit = admit("b", follow, CachedPrefix(handle=stored.handle, length=len(stored.token_ids)))
    cached, done2 = drive(eng, [hit, admit("c", PROMPTS[2])])
    assert done2["b"].cached_tokens == len(stored.token_ids)
    fresh, _ = drive(engine(model, bits), [admit("b", follow), admit("c", PROMPTS[2])])
    assert cached == fresh


def test_a_group_size_that_does_not_fit_turns_quantization_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m, _ = build_tiny_model(tmp_path / "llama", "llama")  # head_dim 16
    with caplog.at_level(logging.WARNING):
        eng = engine(m, 4)
    assert eng.kv_bits == 0 and eng.cache_kinds == ("KVCache",)
    assert "--kv-bits ignored" in caplog.text


def test_flags() -> None:
    s = load_settings(["--kv-bits", "8", "--kv-group-size", "128"], {})
    assert (s.kv_bits, s.kv_group_size) == (8, 128)
    assert load_settings([], {}).kv_bits == 0
