"""Short multi-position attention as plain matrix products (`engine.attention`), against MLX's
own `scaled_dot_product_attention`: grouped-query heads, causal and array masks (boolean and
additive, per row and per head), and the routing rules (one position, sinks and large score
matrices keep MLX's function)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest

from mlx_server.engine import attention


@pytest.fixture
def routed() -> Iterator[None]:
    attention.install(force=True)
    yield
    attention.uninstall()


def qkv(b: int, hq: int, hk: int, length: int, span: int) -> tuple[mx.array, ...]:
    mx.random.seed(length * 31 + span)
    q = mx.random.normal((b, hq, length, 16))
    k = mx.random.normal((b, hk, span, 16))
    v = mx.random.normal((b, hk, span, 16))
    return q, k, v


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("shape", [(3, 3), (5, 40), (1, 9)])
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive", "per-head"])
def test_plain_attention_matches_mlx(
    heads: tuple[int, int], shape: tuple[int, int], kind: str
) -> None:
    hq, hk = heads
    length, span = shape
    b = 2
    q, k, v = qkv(b, hq, hk, length, span)
    mask: Any = None
    if kind == "causal":
        mask = "causal"
    elif kind == "bool":  # a left-padded batch: row 1 ignores its first 2 keys
        keep = mx.arange(span)[None, :] >= mx.array([0, 2])[:, None]
        mask = keep[:, None, None, :] & (mx.ones((length, span), dtype=mx.bool_))[None, None]
    elif kind == "additive":
        mask = mx.random.normal((length, span))
    elif kind == "per-head":
        mask = mx.random.uniform(shape=(b, hq, length, span)) > 0.3
        mask = mask | (mx.arange(span) == 0)  # every row attends somewhere
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = attention.plain(q, k, v, scale=0.25, mask=mask)
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), kind


def test_routing(routed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = attention.plain

    def spy(*args: Any, **kwargs: Any) -> mx.array:
        calls.append("plain")
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "plain", spy)
    for length, span, sinks, want in (
        (4, 30, None, ["plain"]),  # a verification pass
        (1, 30, None, []),  # decode of one row: MLX's own kernel
        (4, 30, mx.zeros((4,)), []),  # attention sinks: MLX's
    ):
        calls.clear()
        q, k, v = qkv(1, 4, 4, length, span)
        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None, sinks=sinks)
        assert calls == want, (length, span)
    calls.clear()
    q, k, v = qkv(2, 4, 4, 1, 30)  # batched decode with a padding mask
    pad = mx.arange(30)[None, None, None, :] >= mx.array([0, 3])[:, None, None, None]
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=pad)
    assert calls == ["plain"]
    monkeypatch.setattr(attention, "MAX_SCORES", 4 * 4 * 29)
    calls.clear()
    q, k, v = qkv(1, 4, 4, 4, 30)
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert calls == []  # scores too large: MLX's


def test_a_model_generates_the_same_tokens_routed(tmp_path: Any) -> None:
    from mlx_lm.generate import generate_step

    from mlx_server.testing.tiny import build_tiny_model

    model, _ = build_tiny_model(tmp_path / "m", "llama")
    prompt = mx.array(list(range(3, 30)))

    def greedy() -> list[int]:
        steps = generate_step(prompt, model, max_tokens=10, sampler=lambda x: mx.argmax(x, -1))
        return [int(t) for t, _ in steps]

    want = greedy()
    attention.install(force=True)
    try:
        assert greedy() == want
    finally:
        attention.uninstall()
    assert attention._fused is None


def test_the_batch_engine_gives_the_same_tokens_routed(tmp_path: Any) -> None:
    """Rows of different lengths in one batch (padding masks), drafts verified (several query
    positions over a growing cache): the same greedy tokens with attention routed."""
    from mlx_server.engine.batch import BatchEngine
    from mlx_server.messages import Admit, GenerationRequest, SamplingParams, TokenOut
    from mlx_server.testing.tiny import build_tiny_model

    model, _ = build_tiny_model(tmp_path / "m", "llama", vocab_size=64)
    prompts = [tuple([5, 6, 7, 8] * 4), tuple(range(10, 33)), tuple([3, 4] * 3)]

    def run() -> dict[str, list[int]]:
        engine = BatchEngine(
            model, eos_token_ids=[], vocab_size=64, prefill_chunk=16, speculative="ngram"
        )
        for i, p in enumerate(prompts):
            request = GenerationRequest(
                request_id=str(i),
                prompt_ids=p,
                sampling=SamplingParams(temperature=0.0),
                max_tokens=30 + 5 * i,
                ignore_eos=True,
            )
            engine.admit(Admit(request=request))
        out: dict[str, list[int]] = {}
        while engine.has_work:
            for ev in engine.step():
                if isinstance(ev, TokenOut):
                    out.setdefault(ev.request_id, []).append(ev.token_id)
        assert engine.drafted > 0
        return out

    want = run()
    attention.install(force=True)
    try:
        assert run() == want
    finally:
        attention.uninstall()
