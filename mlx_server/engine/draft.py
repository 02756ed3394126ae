"""Draft-model speculative decoding for rows of the decode batch.

A small model of the same vocabulary (`--draft-model`) proposes each drafting row's next
tokens; the batch engine verifies them in its one forward pass exactly as it verifies
prompt-lookup drafts (`engine.speculative`): greedy rows keep the prefix the target model
agrees with, sampled rows use rejection sampling against the draft's own distribution.

The draft model keeps one batched KV cache whose rows mirror the engine's decode batch (rows
join and leave with it). It is not kept in step with every decode pass: each row records how
many of its tokens the draft cache holds, and a drafting pass first reads every row's missing
tokens in one right-padded pass (the padding then becomes masked left padding,
`speculative.trim_rows`), then runs one pass per drafted token. Nothing is read back from the
device until all drafts are made: one sync per drafting step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from . import caches as cache_ops
from .sampling import RowSampler, filter_logits
from .speculative import trim_rows

READ_CHUNK = 2048  # prompt tokens the draft model reads per pass when a row joins


class DraftError(ValueError):
    """The draft model cannot draft for this target (another vocabulary, uncuttable caches)."""


def check_pair(
    target_vocab: dict[str, int], draft_vocab: dict[str, int], draft_model: nn.Module
) -> None:
    """Refuse a draft model whose tokens mean something else than the target's, or whose
    caches cannot be cut back to the accepted drafts."""
    if target_vocab != draft_vocab:
        shared = sum(1 for t, i in draft_vocab.items() if target_vocab.get(t) == i)
        raise DraftError(
            "the draft model's tokenizer differs from the model's "
            f"({len(draft_vocab)} vs {len(target_vocab)} tokens, {shared} shared with the same "
            "id): speculative decoding needs the same vocabulary"
        )
    if not cache_ops.all_plain(make_prompt_cache(draft_model)):
        raise DraftError(
            "the draft model's caches are not all plain KV caches (sliding-window or recurrent "
            "layers cannot be cut back to the accepted drafts)"
        )


class Drafter:
    """The draft model and its batched cache, one row per row of the engine's decode batch,
    in the same order."""

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size  # the target's: drafts and their probabilities fit it
        self._backbone = getattr(model, "model", None)
        self.cache: list[Any] | None = None
        # Per row: how many tokens of its text (prompt, then output) the cache holds.
        self.held: list[int] = []
        self._fed = 0  # draft tokens fed in the last `propose` (positions `commit` cuts)
        self._missing: list[int] = []

    @property
    def rows(self) -> int:
        """Rows in the draft cache (a property, not `len`: an empty drafter must not be
        falsy where the code asks whether there is one)."""
        return len(self.held)

    @property
    def nbytes(self) -> int:
        return sum(int(c.nbytes) for c in self.cache or [])

    # -- rows join and leave with the decode batch ------------------------------------------

    def join(self, prompts: Sequence[Sequence[int]]) -> None:
        """Rows appended to the decode batch: the draft model reads their prompts."""
        for prompt in prompts:
            own = make_prompt_cache(self.model)
            for start in range(0, len(prompt), READ_CHUNK):
                chunk = mx.array([list(prompt[start : start + READ_CHUNK])])
                if self._backbone is not None:
                    self._backbone(chunk, cache=own)
                else:
                    self.model(chunk, cache=own)
                mx.eval(cache_ops.arrays(own))
            row = [c.merge([c]) for c in own]
            if self.cache is None:
                self.cache = row
            else:
                for mine, new in zip(self.cache, row, strict=True):
                    mine.extend(new)
            self.held.append(len(prompt))

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows (indices into the batch) stay, in this order."""
        self.held = [self.held[i] for i in rows]
        if not rows:
            self.cache = None
        elif self.cache is not None:
            for c in self.cache:
                c.filter(list(rows))

    def clear(self) -> None:
        self.cache = None
        self.held = []

    # -- drafting --------------------------------------------------------------------------

    def propose(
        self,
        texts: Sequence[tuple[Sequence[int], Sequence[int]]],
        lengths: Sequence[int],
        samplers: Sequence[RowSampler],
    ) -> tuple[list[list[int]], list[mx.array | None]]:
        """Drafts of `lengths[i]` tokens for each row (0: the row does not draft, but its
        missing tokens are read all the same). `texts[i]` is the row's (prompt, output).

        Returns the drafts and, for rows that draft by sampling, the draft distribution each
        drafted token was drawn from ((len, V) probabilities; None for greedy rows, whose
        drafts are the draft model's argmax)."""
        assert self.cache is not None and len(texts) == len(self.held)
        steps = max(lengths)
        missing: list[list[int]] = []
        for (prompt, output), held in zip(texts, self.held, strict=True):
            start = held - len(prompt)
            assert 0 <= start < len(output), (held, len(prompt), len(output))
            missing.append(list(output[start:]))
        width = max(len(m) for m in missing)
        inputs = mx.array([m + [m[-1]] * (width - len(m)) for m in missing], dtype=mx.uint32)
        logits = self.model(inputs, cache=self.cache)
        last = mx.array([len(m) - 1 for m in missing], dtype=mx.int32)
        step_logits = mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]
        trim_rows(self.cache, [len(m) for m in missing], width)
        self._missing = [len(m) for m in missing]
        sampled = [
            i for i, s in enumerate(samplers) if lengths[i] and not s.params.greedy
        ]  # rows that draw their drafts from the draft's distribution
        tokens: list[mx.array] = []
        probs: dict[int, list[mx.array]] = {i: [] for i in sampled}
        for j in range(steps):
            step_logits = step_logits[:, : self.vocab_size].astype(mx.float32)
            token = mx.argmax(step_logits, axis=-1)
            for i in sampled:
                q = mx.softmax(filter_logits(step_logits[i], samplers[i].params))
                probs[i].append(q)
                draw = mx.random.categorical(mx.log(q), key=samplers[i].next_key())
                token = mx.where(mx.arange(token.shape[0]) == i, draw.astype(token.dtype), token)
            tokens.append(token)
            if j + 1 < steps:
                step_logits = self.model(token[:, None], cache=self.cache)[:, -1, :]
        self._fed = steps - 1
        drafted = mx.stack(tokens, axis=1)
        mx.eval(drafted, [p for ps in probs.values() for p in ps])
        table: list[list[int]] = drafted.tolist()  # type: ignore[assignment]
        drafts = [row[:n] for row, n in zip(table, lengths, strict=True)]
        dists: list[mx.array | None] = [None] * len(texts)
        for i, ps in probs.items():
            dists[i] = mx.stack(ps[: lengths[i]])
        return drafts, dists

    def commit(self, accepted: Sequence[int]) -> None:
        """After verification: row i keeps the first `accepted[i]` drafted tokens (those the
        target accepted); the positions of the others are cut."""
        assert self.cache is not None
        kept = [min(a, self._fed) for a in accepted]
        if self._fed:
            trim_rows(self.cache, kept, self._fed)
        self.held = [h + m + k for h, m, k in zip(self.held, self._missing, kept, strict=True)]
        self._fed = 0
