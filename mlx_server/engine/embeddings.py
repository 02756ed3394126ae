"""Sentence embeddings from the loaded causal language model.

Pooling: the backbone (`model.model`, the transformer without its LM head: final hidden states
after the final norm) runs over each input's tokens; the hidden states of all the input's tokens
are averaged (mean pooling, in float32), and the mean is L2-normalised. With `dimensions`, the
pooled vector is truncated to its first `dimensions` components and normalised again.

Inputs are batched with right padding. The attention is causal, so a real token only ever attends
to the real tokens before it: the padding at the end of a row cannot change them, and it is left
out of the mean by a mask. The same input therefore gets the same vector alone and in any batch
(up to float rounding, ~1e-7). Long inputs are processed in chunks through a KV cache, like a
chunked prefill, so that one call never builds an attention matrix over the whole input.

Plain synchronous MLX code: only the executor thread runs `EmbeddingBatch.step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

DEFAULT_CHUNK = 512
DEFAULT_BATCH_TOKENS = 512


class EmbeddingsUnsupported(Exception):
    """The model has no separable backbone to take hidden states from."""


def plan_batches(
    lengths: Sequence[int], *, max_tokens: int = DEFAULT_BATCH_TOKENS, max_waste: float = 0.5
) -> list[list[int]]:
    """Group input indices into padded batches: inputs sorted by length, a batch growing while
    its padded size (rows x longest) stays within `max_tokens` and padding stays under
    `max_waste` of it. An input longer than `max_tokens` gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if current:
            padded = (len(current) + 1) * n  # n is the longest so far: sorted order
            if padded <= max_tokens and (padded - real - n) <= max_waste * padded:
                current.append(i)
                real += n
                continue
            batches.append(current)
        current, real = [i], n
    if current:
        batches.append(current)
    return batches


class EmbeddingBatch:
    """One padded batch of inputs, embedded a chunk of positions per `step()` so that the
    executor can interleave generation steps between chunks."""

    def __init__(
        self,
        model: Any,
        inputs: Sequence[Sequence[int]],
        *,
        dimensions: int | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        backbone = getattr(model, "model", None)
        if backbone is None or not callable(backbone):
            raise EmbeddingsUnsupported("this model has no backbone to take hidden states from")
        if not inputs or any(len(x) == 0 for x in inputs):
            raise ValueError("every input needs at least one token")
        self._model = model
        self._backbone: Any = backbone
        self._lengths = [len(x) for x in inputs]
        self._longest = max(self._lengths)
        self._tokens: mx.array | None = mx.array(
            [list(x) + [0] * (self._longest - len(x)) for x in inputs], dtype=mx.uint32
        )
        self._dimensions = dimensions
        self._chunk = max(1, chunk)
        self._offset = 0
        self._cache: list[Any] | None = None
        self._sums: mx.array | None = None

    @property
    def done(self) -> bool:
        return self._offset >= self._longest

    @property
    def closed(self) -> bool:
        return self._tokens is None

    def close(self) -> None:
        """Drop the MLX state (on the executor thread, like every other MLX call)."""
        self._tokens = self._cache = self._sums = None

    def step(self) -> bool:
        """Run the next chunk of positions through the backbone; True once all are done."""
        if self.done:
            return True
        if self._tokens is None:
            raise RuntimeError("the batch is closed")
        start, end = self._offset, min(self._offset + self._chunk, self._longest)
        if self._cache is None and end < self._longest:
            from mlx_lm.models.cache import make_prompt_cache  # imported on the executor thread

            self._cache = make_prompt_cache(self._model)
        hidden: mx.array = self._backbone(self._tokens[:, start:end], cache=self._cache)
        positions = mx.arange(start, end)[None, :]
        mask = (positions < mx.array(self._lengths)[:, None]).astype(mx.float32)
        part = (hidden.astype(mx.float32) * mask[:, :, None]).sum(axis=1)
        self._sums = part if self._sums is None else self._sums + part
        to_eval: list[Any] = [self._sums]
        if self._cache is not None:
            to_eval.extend(c.state for c in self._cache)
        mx.eval(to_eval)
        self._offset = end
        return self.done

    def result(self) -> list[list[float]]:
        """The pooled, normalised (and truncated) vectors, in input order."""
        if not self.done or self._sums is None:
            raise RuntimeError("the batch has not been fully processed")
        pooled = self._sums / mx.array(self._lengths, dtype=mx.float32)[:, None]
        if self._dimensions is not None:
            pooled = pooled[:, : self._dimensions]
        norms = mx.maximum(mx.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        vectors = pooled / norms
        mx.eval(vectors)
        out: list[list[float]] = vectors.tolist()  # type: ignore[assignment]
        self.close()
        return out


def hidden_size(config: dict[str, Any]) -> int | None:
    """The model's hidden size (the length of an embedding), from its config."""
    for key in ("hidden_size", "n_embd", "d_model"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        return hidden_size(text_config)
    return None
