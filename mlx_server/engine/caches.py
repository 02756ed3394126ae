"""What the engine can do with a model's caches, decided from the cache objects mlx-lm makes
for it (`make_prompt_cache`), never from a list of architectures.

mlx-lm gives each layer one of a few cache types:

- `KVCache`: plain attention. Batched as `BatchKVCache`; a stored state can be cut to any
  prefix.
- `RotatingKVCache`: sliding-window attention (Gemma 3, gpt-oss, Mistral's sliding layers).
  Batched as `BatchRotatingKVCache`; a stored state can be cut to any prefix until the window
  has dropped its first positions, and after that reused only whole.
- `ArraysCache`: a recurrent state (gated delta nets, Mamba, LFM2's short convolutions) in
  hybrid and state-space models. Batched by stacking; a stored state holds the sum of all the
  tokens read, so it can be reused only whole (by a prompt that continues all of its tokens).
- `CacheList`: several of the above for one layer; it can do what all of its parts can.

A cache type without `merge` (mlx-lm's chunked and quantized caches, or a model's own) cannot
join a batch: such a model decodes one request at a time, as mlx-lm's server does (its
`is_batchable` test is the same). A type this module does not know is never stored for reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

from .kv_quant import QuantKVCache


def batchable(caches: Sequence[Any]) -> bool:
    """Whether rows with these caches can decode together (every type merges into a batch)."""
    return all(hasattr(c, "merge") for c in caches)


def storable(caches: Sequence[Any]) -> bool:
    """Whether a finished request's state can be kept for the prompt cache at all."""
    return all(_storable(c) for c in caches)


def _storable(c: Any) -> bool:
    if type(c) is CacheList:
        return all(_storable(x) for x in c.caches)
    return type(c) in (KVCache, RotatingKVCache, ArraysCache, QuantKVCache)


def all_plain(caches: Sequence[Any]) -> bool:
    """Plain KV caches only: the model can read several prompts in one left-padded batch."""
    return all(type(c) is KVCache for c in caches)


def cuttable(caches: Sequence[Any]) -> bool:
    """Whether a (single-sequence) state can be cut to any shorter prefix right now."""
    return all(_cuttable(c) for c in caches)


def _cuttable(c: Any) -> bool:
    t = type(c)
    if t is KVCache or t is QuantKVCache:
        return True
    if t is RotatingKVCache:
        return c.keys is None or _ordered(c).shape[2] == c.offset  # nothing dropped yet
    if t is CacheList:
        return all(_cuttable(x) for x in c.caches)
    return False


def kinds(caches: Sequence[Any]) -> tuple[str, ...]:
    """The cache type names of a model, for logs and the README's table."""
    names: list[str] = []
    for c in caches:
        parts = c.caches if type(c) is CacheList else (c,)
        for p in parts:
            if type(p).__name__ not in names:
                names.append(type(p).__name__)
    return tuple(names)


def copy_prefix(cache: Any, length: int, total: int) -> Any | None:
    """A fresh single-sequence cache holding the first `length` of the `total` positions a
    stored `cache` covers, or None when this cache cannot give that prefix. The stored cache
    is left untouched (it may serve other requests later)."""
    t = type(cache)
    if t is CacheList:
        parts = [copy_prefix(c, length, total) for c in cache.caches]
        if any(p is None for p in parts):
            return None
        return CacheList(*parts)
    if t is KVCache:
        if cache.keys is None or length > cache.offset:
            return None
        new = KVCache()
        new.keys = cache.keys[..., :length, :]
        new.values = cache.values[..., :length, :]
        new.offset = length
        return new
    if t is QuantKVCache:
        if cache.keys is None or length > cache.offset:
            return None
        new = QuantKVCache(group_size=cache.group_size, bits=cache.bits)
        new.keys = tuple(x[..., :length, :] for x in cache.keys)
        new.values = tuple(x[..., :length, :] for x in cache.values)
        new.offset = length
        return new
    if t is RotatingKVCache:
        if cache.keys is None:
            return None
        keys, values = _ordered(cache), _ordered(cache, values=True)
        whole = keys.shape[2] == cache.offset  # every position still there
        if not (whole and length <= cache.offset) and length != cache.offset:
            return None
        if whole:
            keys, values = keys[..., :length, :], values[..., :length, :]
        else:
            keys, values = keys[..., :, :], values[..., :, :]
        new = RotatingKVCache(max_size=cache.max_size, keep=cache.keep)
        new.keys, new.values = keys, values
        new.offset = length
        new._idx = keys.shape[2]
        return new
    if t is ArraysCache:
        if length != total:
            return None
        new = ArraysCache(len(cache.cache))
        new.cache = [a[...] if a is not None else None for a in cache.cache]
        return new
    return None


def _ordered(c: RotatingKVCache, *, values: bool = False) -> mx.array:
    """The rotating buffer's positions in temporal order (a new array, or a slice)."""
    v = c.values if values else c.keys
    return c._temporal_order(v)


def arrays(caches: Sequence[Any]) -> list[mx.array]:
    """Every array a list of caches holds (to evaluate them)."""
    out: list[mx.array] = []
    for c in caches:
        out.extend(a for _, a in tree_flatten(c.state) if isinstance(a, mx.array))
    return out
