"""Quantized KV caches that batch (`--kv-bits 4|8`, `--kv-group-size`).

mlx-lm has a single-sequence `QuantizedKVCache` (keys and values stored as `mx.quantize`
triples: packed integers, scales, biases) but no batched form, so its server cannot batch a
model whose cache is quantized. `QuantKVCache` is mlx-lm's cache plus `merge` (so rows join a
batch); `BatchQuantKVCache` is the batched form, laid out as mlx-lm's `BatchKVCache` is (rows
left-padded to one index, a per-row offset for the rotary positions, a padding mask), holding
quantized triples. mlx-lm's attention sees the `bits` and `group_size` attributes and runs its
quantized attention (`quantized_matmul` over the packed keys and values).

Only plain KV layers are quantized (the engine refuses `--kv-bits` for other cache types), and
quantized rows do not draft (speculative decoding needs caches it can cut per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache

Triple = tuple[mx.array, mx.array, mx.array]


class QuantKVCache(QuantizedKVCache):
    """mlx-lm's single-sequence quantized cache, able to join a batch."""

    @classmethod
    def merge(cls, caches: Sequence[QuantKVCache]) -> BatchQuantKVCache:
        return BatchQuantKVCache.merge(caches)


def quantize_caches(caches: list[Any], bits: int, group_size: int) -> list[Any]:
    """A model's fresh caches with every plain KV cache replaced by a quantized one."""
    return [
        QuantKVCache(group_size=group_size, bits=bits) if type(c) is KVCache else c for c in caches
    ]


def _empty(shape: tuple[int, int, int], dim: int, dtype: mx.Dtype, bits: int, gs: int) -> Triple:
    per_int = 32 // bits
    return (
        mx.zeros((*shape, dim // per_int), dtype=mx.uint32),
        mx.zeros((*shape, dim // gs), dtype=dtype),
        mx.zeros((*shape, dim // gs), dtype=dtype),
    )


def _cat(a: Triple, b: Triple, axis: int = 0) -> Triple:
    x, y, z = (mx.concatenate([p, q], axis=axis) for p, q in zip(a, b, strict=True))
    return x, y, z


def _dim(t: Triple, bits: int) -> int:
    """The unquantized last dimension of a triple."""
    return t[0].shape[-1] * (32 // bits)


class BatchQuantKVCache(_BaseCache):
    """Several rows' quantized KV states, left-padded to one index (see `BatchKVCache`)."""

    step = 256

    def __init__(self, left_padding: Sequence[int], *, group_size: int, bits: int) -> None:
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(list(left_padding))
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        B, H, S, Dk = keys.shape
        Dv = values.shape[-1]
        prev = self._idx
        if self.keys is None or self.values is None or prev + S > self.keys[0].shape[2]:
            n = (self.step + S - 1) // self.step * self.step
            gs, bits = self.group_size, self.bits
            new_k = _empty((B, H, n), Dk, keys.dtype, bits, gs)
            new_v = _empty((B, H, n), Dv, keys.dtype, bits, gs)
            if self.keys is not None and self.values is not None:
                old_k = tuple(x[..., :prev, :] for x in self.keys)
                old_v = tuple(x[..., :prev, :] for x in self.values)
                new_k = _cat(old_k, new_k, axis=2)  # type: ignore[arg-type]
                new_v = _cat(old_v, new_v, axis=2)  # type: ignore[arg-type]
            self.keys, self.values = new_k, new_v  # type: ignore[assignment]
        assert self.keys is not None and self.values is not None
        self.offset = self.offset + S
        self._idx += S
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for i in range(3):
            self.keys[i][..., prev : self._idx, :] = qk[i]
            self.values[i][..., prev : self._idx, :] = qv[i]
        return self._fetch()

    def _fetch(self) -> tuple[Triple, Triple]:
        assert self.keys is not None and self.values is not None
        n = self._idx
        k = tuple(x[..., :n, :] for x in self.keys)
        v = tuple(x[..., :n, :] for x in self.values)
        return k, v  # type: ignore[return-value]

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    @property
    def state(self) -> Any:
        return self.keys, self.values, self.offset, self.left_padding

    @state.setter
    def state(self, v: Any) -> None:
        self.keys, self.values, self.offset, self.left_padding = v

    def size(self) -> int:  # pyright: ignore[reportIncompatibleMethodOverride]
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(int(x.nbytes) for x in (*self.keys, *self.values))

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = tuple(x[batch_indices] for x in self.keys)  # type: ignore[assignment]
            self.values = tuple(x[batch_indices] for x in self.values)  # type: ignore[assignment]
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        least: int = self.left_padding.min().item()  # type: ignore[assignment]
        if least > 0:
            if self.keys is not None and self.values is not None:
                self.keys = tuple(x[..., least:, :] for x in self.keys)  # type: ignore[assignment]
                self.values = tuple(x[..., least:, :] for x in self.values)  # type: ignore[assignment]
            self._idx -= least
            self.left_padding = self.left_padding - least

    def extend(self, other: BatchQuantKVCache) -> None:
        """Append other's rows, both right-aligned to the longer index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        ref = self if self.keys is not None else other
        assert ref.keys is not None and ref.values is not None
        H = ref.keys[0].shape[1]
        dk, dv = _dim(ref.keys, self.bits), _dim(ref.values, self.bits)
        dtype = ref.keys[1].dtype

        def aligned(c: BatchQuantKVCache) -> tuple[Any, Any, mx.array]:
            rows = c.offset.shape[0]
            if c.keys is None or c.values is None:
                k = _empty((rows, H, 0), dk, dtype, self.bits, self.group_size)
                v = _empty((rows, H, 0), dv, dtype, self.bits, self.group_size)
            else:
                k = tuple(x[..., : c._idx, :] for x in c.keys)  # type: ignore[assignment]
                v = tuple(x[..., : c._idx, :] for x in c.values)  # type: ignore[assignment]
            left = idx - c._idx
            if left:
                pad = [(0, 0), (0, 0), (left, 0), (0, 0)]
                k = tuple(mx.pad(x, pad) for x in k)  # type: ignore[assignment]
                v = tuple(mx.pad(x, pad) for x in v)  # type: ignore[assignment]
            return k, v, c.left_padding + left

        k1, v1, p1 = aligned(self)
        k2, v2, p2 = aligned(other)
        self.keys, self.values = _cat(k1, k2), _cat(v1, v2)
        self.left_padding = mx.concatenate([p1, p2])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = idx

    def extract(self, idx: int) -> QuantKVCache:
        cache = QuantKVCache(group_size=self.group_size, bits=self.bits)
        pad: int = self.left_padding[idx].item()  # type: ignore[assignment]
        if self.keys is not None and self.values is not None:
            sl = slice(pad, self._idx)
            k = tuple(mx.contiguous(x[idx : idx + 1, :, sl]) for x in self.keys)
            v = tuple(mx.contiguous(x[idx : idx + 1, :, sl]) for x in self.values)
            cache.keys, cache.values = k, v
            cache.offset = self._idx - pad
        return cache

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> BatchQuantKVCache:
        first = caches[0]
        gs, bits = first.group_size, first.bits
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        most = max(lengths)
        out = cls([most - n for n in lengths], group_size=gs, bits=bits)
        if most == 0:
            return out
        ref = next(c for c in caches if c.keys is not None)
        H = ref.keys[0].shape[1]
        dk, dv = _dim(ref.keys, bits), _dim(ref.values, bits)
        dtype = ref.keys[1].dtype
        keys = _empty((len(caches), H, most), dk, dtype, bits, gs)
        values = _empty((len(caches), H, most), dv, dtype, bits, gs)
        for i, (n, c) in enumerate(zip(lengths, caches, strict=True)):
            if not n:
                continue
            for j in range(3):
                keys[j][i : i + 1, :, most - n :] = c.keys[j][..., :n, :]
                values[j][i : i + 1, :, most - n :] = c.values[j][..., :n, :]
        out.keys, out.values = keys, values
        out.offset = out.offset + most
        out._idx = most
        return out
