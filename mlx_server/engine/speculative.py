"""Speculative decoding for rows of the decode batch: prompt lookup, and the verification
that drafts from a draft model (`engine.draft`) share.

A row drafts the tokens that followed the last time its latest n-gram appeared in its own prompt
or output (agents re-emitting a file, edits, quotes: text that is already there). The batch
engine verifies every row's draft in the same forward pass as the other rows' ordinary decode
step and keeps, per row, the longest draft prefix the model agrees with:

- greedy rows accept a drafted token while it is the argmax, then emit the model's own token:
  the output is the one decoding without drafts gives, token for token;
- sampled rows use rejection sampling: drafted token t is accepted with probability
  min(1, p(t) / q(t)) under the row's own (temperature, top-k/top-p/min-p) distribution p and
  the draft's q (a point mass for prompt lookup: then p(t)); on rejection the token is drawn
  from max(p - q, 0) renormalised. Each emitted token then has exactly the distribution plain
  sampling gives.

The KV cache then holds positions for drafts that were rejected; `trim_rows` cuts each row back
to what it accepted. Only plain KV caches can be cut that way (recurrent states cannot forget a
token, a rotating window may already have dropped the positions it would need), so the engine
drafts only for models whose every layer has a plain KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..messages import SamplingParams
from .sampling import filter_logits

MODES = ("off", "ngram", "draft", "auto")


def resolve(mode: str) -> str:
    """The mode the engine runs for the flag's value on this device. auto is off on a CPU: a
    pass that verifies k drafted tokens costs about k passes there (the matrix products are
    bound by compute, not by reading the weights), so drafting loses even when most drafts
    are accepted (bench/speculative.py: 0.7-0.8x with 55-60% of drafts accepted)."""
    if mode == "auto" and mx.default_device() == mx.cpu:
        return "off"
    return mode


class NgramIndex:
    """Where each n-gram (min_n..max_n tokens) of a token list last appeared, updated as tokens
    are appended, so that a lookup costs a few dictionary reads however long the text is."""

    def __init__(self, tokens: Sequence[int], *, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        # n-gram -> the index of the token that followed its latest occurrence.
        self._next: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        toks, table = self.tokens, self._next
        for t in tokens:
            toks.append(t)
            # The n-grams that end just before the new token now have a continuation.
            end = len(toks) - 1
            for n in range(self.min_n, min(self.max_n, end) + 1):
                table[tuple(toks[end - n : end])] = end

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest n-gram the text ends with, or []."""
        toks = self.tokens
        for n in range(min(self.max_n, len(toks)), self.min_n - 1, -1):
            start = self._next.get(tuple(toks[len(toks) - n :]))
            if start is not None:
                return toks[start : start + k]
        return []

    def has_draft(self) -> bool:
        toks = self.tokens
        return any(
            tuple(toks[len(toks) - n :]) in self._next
            for n in range(self.min_n, min(self.max_n, len(toks)) + 1)
        )


def accept_greedy(targets: Sequence[int], draft: Sequence[int]) -> list[int]:
    """Tokens a greedy row emits: the drafted ones while they equal the model's argmax
    (`targets[j]` is the argmax after the input's j-th position), then the model's own."""
    out: list[int] = []
    for j, d in enumerate(draft):
        if targets[j] != d:
            break
        out.append(d)
    out.append(targets[len(out)])
    return out


def accept_sampled(
    logits: mx.array,
    draft: Sequence[int],
    params: SamplingParams,
    key: mx.array | None,
    draft_probs: mx.array | None = None,
) -> list[int]:
    """Tokens a sampled row emits, by rejection sampling. `logits` are the row's
    (len(draft) + 1, V) float32 logits, any logit bias applied; `draft_probs` the (len(draft),
    V') distributions the drafts were drawn from (a draft model's), or None for a point-mass
    draft (prompt lookup).

    Drafted token t is kept with probability min(1, p(t) / q(t)); at the first one rejected
    the token is drawn from max(p - q, 0), renormalised (for a point mass: p with t taken out).
    Each emitted token then has the distribution plain sampling gives."""
    k = len(draft)
    filtered = mx.stack([filter_logits(logits[j], params) for j in range(k + 1)])
    probs = mx.softmax(filtered, axis=-1)
    vocab = probs.shape[-1]
    ids = mx.array(list(draft), dtype=mx.int32)
    p_draft = mx.take_along_axis(probs[:k], ids[:, None], axis=1)[:, 0]
    q: mx.array | None = None
    if draft_probs is not None:
        q = draft_probs[:, :vocab]
        if q.shape[-1] < vocab:
            q = mx.concatenate([q, mx.zeros((k, vocab - q.shape[-1]), dtype=q.dtype)], axis=1)
        q_draft = mx.take_along_axis(q, ids[:, None], axis=1)[:, 0]
    else:
        q_draft = mx.ones((k,), dtype=mx.float32)
    if key is not None:
        key, sub = mx.random.split(key)
        u = mx.random.uniform(shape=(k,), key=sub)
    else:
        u = mx.random.uniform(shape=(k,))
    mx.eval(p_draft, q_draft, u)
    p_list: list[float] = p_draft.tolist()  # type: ignore[assignment]
    q_list: list[float] = q_draft.tolist()  # type: ignore[assignment]
    u_list: list[float] = u.tolist()  # type: ignore[assignment]
    out: list[int] = []
    for j in range(k):
        if u_list[j] * q_list[j] >= p_list[j]:
            break
        out.append(draft[j])
    j = len(out)
    if j < k:
        # Rejected: draw from what p has beyond q (for a point mass, p without the draft).
        if q is None:
            row = mx.where(mx.arange(vocab) == draft[j], 0.0, probs[j])
        else:
            row = mx.maximum(probs[j] - q[j], 0.0)
            # p <= q everywhere only when p == q, where rejection has probability 0.
            row = mx.where(mx.sum(row) > 0, row, probs[j])
        choice = mx.random.categorical(mx.log(row), key=key)
    else:
        choice = mx.random.categorical(filtered[k], key=key)
    picked: int = choice.item()  # type: ignore[assignment]
    out.append(picked)
    return out


def trim_rows(cache: list[Any], keep: Sequence[int], width: int) -> None:
    """After a verification pass that wrote `width` positions for every row, cut row i back to
    its first `keep[i]` of them.

    A lone row's `KVCache` is simply trimmed. In a `BatchKVCache` every row ends at the same
    index: the batch is trimmed to the longest row, and each shorter row's positions are
    shifted right over its rejected ones, which become left padding (masked out)."""
    most = max(keep)
    for c in cache:
        if type(c) is KVCache:
            c.trim(width - keep[0])
            continue
        assert type(c) is BatchKVCache, type(c)
        c.trim(width - most)
        extra = [most - k for k in keep]
        if not any(extra) or c.keys is None:
            continue
        rows = [i for i, e in enumerate(extra) if e]
        idx = mx.array(rows, dtype=mx.int32)
        shifts = mx.array([extra[i] for i in rows], dtype=mx.int32)
        n = c._idx
        # Row r's position p comes from p - shift (rejected positions wrap to the front,
        # where the padding mask hides them).
        src = (mx.arange(n)[None, :] - shifts[:, None]) % n
        for name in ("keys", "values"):
            arr = getattr(c, name)
            sub = arr[idx, :, :n, :]
            gather = mx.broadcast_to(src[:, None, :, None], sub.shape)
            arr[idx, :, :n, :] = mx.take_along_axis(sub, gather, axis=2)
        pad = mx.zeros((len(keep),), dtype=c.left_padding.dtype)
        pad[idx] = shifts.astype(pad.dtype)
        c.left_padding = c.left_padding + pad
        c.offset = c.offset - pad
