"""Token sampling for a batch of rows, each with its own parameters.

Runs on the executor thread. Greedy rows share one argmax; sampled rows are filtered
(top-k, top-p, min-p) and drawn one by one, each from its own random key when a seed is given,
so a seeded request gives the same tokens alone or inside any batch. A constrained row (structured
output, `engine.constrain`) has every token its grammar forbids masked out first.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..messages import SamplingParams
from .constrain import Constraint

NEG_INF = -math.inf


class RowSampler:
    """Per-request sampling state: the random key of a seeded request, penalty counters, and
    the grammar matcher of a constrained request."""

    def __init__(
        self, params: SamplingParams, vocab_size: int, constraint: Constraint | None = None
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.key: mx.array | None = (
            mx.random.key(params.seed % 2**64) if params.seed is not None else None
        )
        bias = [(t, b) for t, b in params.logit_bias if 0 <= t < vocab_size]
        self.bias_ids = mx.array([t for t, _ in bias], dtype=mx.int32) if bias else None
        self.bias_vals = mx.array([b for _, b in bias], dtype=mx.float32) if bias else None
        self.counts: dict[int, int] = {}

    @property
    def history_free(self) -> bool:
        """Whether the next token's distribution ignores the tokens before it (no penalties,
        no grammar): such a row can be sampled a step ahead of reading its last token."""
        p = self.params
        return (
            self.constraint is None
            and p.repetition_penalty == 1.0
            and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0
        )

    @property
    def needs_processing(self) -> bool:
        p = self.params
        return (
            self.bias_ids is not None
            or (p.repetition_penalty != 1.0 and bool(self.counts))
            or (p.presence_penalty != 0.0 and bool(self.counts))
            or (p.frequency_penalty != 0.0 and bool(self.counts))
        )

    def observe(self, token_id: int) -> None:
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        if self.constraint is not None:
            self.constraint.advance(token_id)

    @property
    def grammar_done(self) -> bool:
        """A constrained output is complete: nothing may follow it."""
        return self.constraint is not None and self.constraint.done

    def process(self, logits: mx.array) -> mx.array:
        """Apply logit bias and penalties to one row of logits (shape (V,))."""
        p = self.params
        if self.bias_ids is not None and self.bias_vals is not None:
            logits = logits.at[self.bias_ids].add(self.bias_vals)
        if self.counts:
            ids = mx.array(list(self.counts.keys()), dtype=mx.int32)
            if p.repetition_penalty != 1.0:
                sel = logits[ids]
                sel = mx.where(sel < 0, sel * p.repetition_penalty, sel / p.repetition_penalty)
                logits[ids] = sel
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                freq = mx.array(list(self.counts.values()), dtype=mx.float32)
                logits = logits.at[ids].add(-(p.presence_penalty + p.frequency_penalty * freq))
        return logits

    def next_key(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature, then top-k, top-p and min-p masking of one row (shape (V,))."""
    logits = logits / max(params.temperature, 1e-5)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits)[vocab - params.top_k]
        logits = mx.where(logits < kth, NEG_INF, logits)
    if 0.0 < params.top_p < 1.0:
        order = mx.argsort(-logits)
        sorted_logits = logits[order]
        probs = mx.softmax(sorted_logits)
        cum = mx.cumsum(probs)
        # keep tokens whose preceding mass is below top_p (the first always stays)
        drop_sorted = (cum - probs) >= params.top_p
        drop = drop_sorted[mx.argsort(order)]
        logits = mx.where(drop, NEG_INF, logits)
    if params.min_p > 0.0:
        logprobs = logits - mx.logsumexp(logits)
        threshold = mx.max(logprobs) + math.log(params.min_p)
        logits = mx.where(logprobs < threshold, NEG_INF, logits)
    return logits


def sample_batch(logits: mx.array, samplers: list[RowSampler]) -> tuple[mx.array, mx.array]:
    """Choose one token per row. Returns (tokens (B,), logprobs (B, V)) as lazy arrays; in the
    all-greedy case without logprobs the second array is the (processed) logits.

    logprobs are of the processed (biased, penalised, grammar-masked) but unfiltered
    distribution, which is what OpenAI reports."""
    logits = logits.astype(mx.float32)
    if any(s.needs_processing for s in samplers):
        rows = [
            s.process(logits[i]) if s.needs_processing else logits[i]
            for i, s in enumerate(samplers)
        ]
        logits = mx.stack(rows)
    constrained = [(i, s.constraint) for i, s in enumerate(samplers) if s.constraint is not None]
    if constrained:
        # One (B, V) mask and one `where` for the whole batch; unconstrained rows allow all.
        allowed: np.ndarray = np.ones(logits.shape, dtype=np.bool_)
        for i, constraint in constrained:
            allowed[i] = constraint.allowed(logits.shape[-1])
        logits = mx.where(mx.array(allowed), logits, NEG_INF)
    if not any(not s.params.greedy or s.params.logprobs for s in samplers):
        # All greedy (the common case): no normalisation needed to take the argmax.
        return mx.argmax(logits, axis=-1).astype(mx.uint32), logits
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tokens = mx.argmax(logprobs, axis=-1)
    sampled_rows = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if sampled_rows:
        tokens = tokens.astype(mx.uint32)
        # Rows with temperature alone and no seed are drawn together in one call; the others
        # (filters, or a seed and so a key of their own) one by one.
        plain = [i for i in sampled_rows if _temperature_only(samplers[i])]
        if plain:
            idx = mx.array(plain, dtype=mx.int32)
            temps = mx.array([max(samplers[i].params.temperature, 1e-5) for i in plain])
            drawn = mx.random.categorical(logprobs[idx] / temps[:, None], axis=-1)
            tokens[idx] = drawn.astype(mx.uint32)
        rest = [i for i in sampled_rows if i not in set(plain)]
        if rest:
            picks = []
            for i in rest:
                s = samplers[i]
                filtered = filter_logits(logprobs[i], s.params)
                key = s.next_key()
                picks.append(mx.random.categorical(filtered, key=key))
            idx = mx.array(rest, dtype=mx.int32)
            tokens[idx] = mx.stack(picks).astype(mx.uint32)
    return tokens.astype(mx.uint32), logprobs


def _temperature_only(sampler: RowSampler) -> bool:
    p = sampler.params
    return sampler.key is None and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0
