"""Attention for passes of a few query positions, without cuDNN's per-shape graphs.

MLX's CUDA backend runs `mx.fast.scaled_dot_product_attention` with its own kernel for one
query position (decode) and through cuDNN for more. cuDNN builds an execution graph for each new
(queries, keys) shape and caches it; building one takes tens of milliseconds. Passes of a few
positions over a growing cache have a new shape almost every time: a verification pass of
drafted tokens, the new part of a prompt after a cached prefix, a short chat prompt. On an
H200 (MLX 0.32) one stream with prompt-lookup drafts decoded at 31 tok/s against 478 tok/s
without them, every verification pass stalling ~80 ms (bench/gpu_session.sh, issue 18).

For such passes the scores matrix is small, and plain matrix products (cuBLAS, which needs no
per-shape plan) compute attention at once. `install` routes them there on MLX's CUDA backend,
and single-position passes with an array mask too (a batch's rows padded to one length, whose
key count grows every step); long prompts (whose scores would be large) and unmasked
single-position passes keep MLX's kernels.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

log = logging.getLogger(__name__)

# A pass takes the plain way when its scores hold at most this many elements (float32).
MAX_SCORES = 1 << 24

_fused: Any = None  # MLX's own function, once `install` has replaced it
# A masked score: finite, so that a row with every key masked (a padding position of a
# left-padded batch) gives finite garbage that nothing reads, not NaNs.
_MASKED = float(mx.finfo(mx.float32).min)


def plain(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None = None,
) -> mx.array:
    """softmax(q k^T * scale + mask) v with grouped-query heads, in float32 scores.
    queries (B, Hq, L, D); keys and values (B, Hk, S, D); a causal mask puts the queries at the
    last L of the S positions; an array mask is boolean (True: attend) or additive."""
    b, hq, length, dim = queries.shape
    hk, span = keys.shape[1], keys.shape[2]
    groups = hq // hk
    q = (queries * scale).reshape(b, hk, groups, length, dim)
    scores = (q @ keys[:, :, None].swapaxes(-1, -2)).astype(mx.float32)  # (B, Hk, G, L, S)
    if isinstance(mask, str):
        assert mask == "causal", mask
        rows = mx.arange(span - length, span)[:, None]
        allowed = rows >= mx.arange(span)[None, :]
        scores = mx.where(allowed, scores, _MASKED)
    elif mask is not None:
        m = mask
        if m.ndim == 4:  # (B or 1, Hq or 1, L, S): split the query heads into groups
            heads = m.shape[1]
            m = m.reshape(
                m.shape[0], hk if heads > 1 else 1, groups if heads > 1 else 1, *m.shape[2:]
            )
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, _MASKED)
        else:
            scores = scores + m.astype(mx.float32)
    probs = mx.softmax(scores, axis=-1).astype(values.dtype)
    out = probs @ values[:, :, None]  # (B, Hk, G, L, D)
    return out.reshape(b, hq, length, values.shape[-1])


def _routed(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None = None,
    sinks: mx.array | None = None,
    **kwargs: Any,
) -> mx.array:
    b, hq, length, _ = queries.shape
    several = length > 1 or isinstance(mask, mx.array)  # a batch's padding mask, say
    if sinks is None and not kwargs and several and b * hq * length * keys.shape[2] <= MAX_SCORES:
        return plain(queries, keys, values, scale=scale, mask=mask)
    return _fused(queries, keys, values, scale=scale, mask=mask, sinks=sinks, **kwargs)


def wanted() -> bool:
    cuda = getattr(mx, "cuda", None)
    return mx.default_device() != mx.cpu and bool(cuda is not None and cuda.is_available())


def install(force: bool = False) -> bool:
    """Route short multi-position attention to `plain` (on MLX's CUDA backend, or anywhere
    with `force`); returns whether it is routed."""
    global _fused
    if _fused is not None:
        return True
    if not (force or wanted()):
        return False
    _fused = mx.fast.scaled_dot_product_attention
    mx.fast.scaled_dot_product_attention = _routed
    log.info("attention of up to %d score elements runs as plain matrix products", MAX_SCORES)
    return True


def uninstall() -> None:
    global _fused
    if _fused is not None:
        mx.fast.scaled_dot_product_attention = _fused
        _fused = None
