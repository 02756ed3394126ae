"""Continuous batching: chunked prefill per request, one batched decode pass per step.

Plain synchronous code that owns MLX state; only the executor thread calls it. One `step()`:

1. spends a budget of `prefill_chunk` prompt tokens on the requests still reading their prompts
   (each in its own single-sequence cache); a request whose prompt is done samples its first
   token and joins the decode batch, its cache merged into the batched KV cache;
2. runs one forward pass over every request in the decode batch and samples one token each;
3. retires requests that hit EOS, a stop token, their token limit or the end of their grammar
   (structured output), filtering them out of the batch and (optionally) keeping their KV state
   for the prompt cache.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from ..messages import (
    Admit,
    FinishReason,
    GenerationRequest,
    PrefillProgress,
    SequenceFinished,
    StoredCache,
    TokenOut,
    TopLogprob,
)
from . import caches as cache_ops
from .constrain import Constraint
from .constrain import start as start_constraint
from .disk_cache import DiskCache
from .draft import Drafter
from .kv_quant import BatchQuantKVCache, quantize_caches
from .memory import prefill_budget
from .sampling import RowSampler, sample_batch
from .speculative import NgramIndex, accept_greedy, accept_sampled, trim_rows
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

StepEvent = TokenOut | PrefillProgress | SequenceFinished
BURST_FACTOR = 4  # prompt budget multiple for a batch of fresh prompts when nothing decodes
ONE_PASS_TOKENS = 64  # a prompt rest shorter than this is read in its sampling pass


class Sequence:
    """Executor-side state of one request."""

    def __init__(
        self,
        request: GenerationRequest,
        cache: list[Any],
        cached: int,
        vocab: int,
        constraint: Constraint | None = None,
    ):
        self.request = request
        self.rid = request.request_id
        self.prompt = list(request.prompt_ids)
        self.cache: list[Any] | None = cache
        self.prefilled = cached
        self.cached_tokens = cached
        self.generated: list[int] = []
        self.sampler = RowSampler(request.sampling, vocab, constraint)
        self.stop_ids = frozenset(request.stop_token_ids)
        # Speculative decoding: the row's n-gram index (built at its first lookup) and, in
        # auto mode, how many steps it waits before drafting again after a rejected draft.
        self.ngrams: NgramIndex | None = None
        self.misses = 0
        self.wait = 0
        # How many tokens it drafts next: grows while whole drafts are accepted, shrinks to
        # what was accepted otherwise (a long draft costs compute where it is mostly wrong).
        self.draft_len = 2
        # Drafted tokens it has been getting accepted per draft (a moving average).
        self.gain = 1.0


class BatchEngine:
    """Owns the model, the decode batch and the KV states kept for the prompt cache."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_token_ids: Iterable[int],
        vocab_size: int,
        prefill_chunk: int = 512,
        keep_caches: bool = True,
        tokenizer: Tokenizer | None = None,
        speculative: str = "off",
        draft_tokens: int = 6,
        kv_bits: int = 0,
        kv_group_size: int = 64,
        disk: DiskCache | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer  # compiles the grammars of constrained requests
        self.eos_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        # 0: from the device (engine.memory.prefill_budget).
        self.prefill_chunk = prefill_chunk if prefill_chunk > 0 else prefill_budget()
        self.keep_caches = keep_caches
        self.prefilling: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.batch_cache: list[Any] | None = None
        # Kept states for the prompt cache: (caches, how many positions they cover).
        self.stored: dict[int, tuple[list[Any], int]] = {}
        self._next_handle = 1
        self._backbone = getattr(model, "model", None)
        # What this model's caches allow (see `engine.caches`): decoding rows together needs
        # caches that merge into a batch; prompt reuse needs caches we know how to copy (cut to
        # any prefix for KV caches, reused whole for recurrent state).
        caches = make_prompt_cache(model)
        # Quantized KV caches (`engine.kv_quant`): for models whose every layer is plain KV.
        self.kv_bits = kv_bits if cache_ops.all_plain(caches) else 0
        self.kv_group_size = kv_group_size
        if kv_bits and not self.kv_bits:
            log.warning("--kv-bits ignored: this model's caches are not all plain KV caches")
        self._plain = cache_ops.all_plain(caches)
        if self.kv_bits:
            try:  # a group size that does not divide the head dimension fails here, not later
                probe = self._new_cache()
                self.model(mx.array([[0]]), cache=probe)
                mx.eval(cache_ops.arrays(probe))
            except Exception as exc:  # the model's attention may not take quantized caches
                log.warning("--kv-bits ignored: cannot quantize this model's KV cache: %s", exc)
                self.kv_bits = 0
        caches = self._new_cache()
        self.cache_kinds = cache_ops.kinds(caches)
        self.batchable = cache_ops.batchable(caches)
        self.can_reuse = cache_ops.storable(caches)
        self._n_caches = len(caches)
        # New prompts that arrive together are read in one batch: left-padded for plain KV
        # caches (`_plain`, set above), right-padded (mlx-lm's prepare/finalize) for the other
        # types that batch.
        self.batch_prefill = self.batchable and getattr(model, "batched_prefill", True)
        # Distributed serving: makes every rank use rank 0's sampled tokens (lazily, in-graph).
        self.share_tokens: Callable[[mx.array], mx.array] | None = None
        # The next tokens of the first rows of the batch, computed ahead and not yet read.
        self._pending: mx.array | None = None
        self._batched = False  # whether batch_cache holds batched caches or one row's own
        # Prompt-lookup speculative decoding (`engine.speculative`): only where every cache
        # can be cut back to the accepted drafts, and the model gives every position's logits.
        can_draft = (
            self._plain
            and not self.kv_bits
            and isinstance(model, nn.Module)
            and getattr(model, "multi_token_logits", True)
        )
        self.speculative = speculative if can_draft else "off"
        self.draft_tokens = max(1, draft_tokens)
        # Draft-model speculative decoding (`engine.draft`): in draft mode, and in auto mode
        # when a draft model is given; prompt lookup otherwise.
        self.drafter = drafter if self.speculative in ("draft", "auto") else None
        if self.speculative == "draft" and drafter is None:
            self.speculative = "off"
        # The prompt cache on disk (`engine.disk_cache`): plain KV caches of a text model only
        # (a vision model's state depends on images its token ids do not name).
        text_model = isinstance(model, nn.Module)
        self.disk = disk if self._plain and not self.kv_bits and text_model else None
        self.drafted = 0  # draft tokens proposed and accepted, since the start
        self.accepted = 0

    # -- commands --------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.prefilling or self.running)

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.running)

    def admit(self, admit: Admit) -> PrefillProgress:
        request = admit.request
        constraint = None
        if request.constraint is not None:
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer to compile constraints with")
            constraint = start_constraint(request.constraint, self.tokenizer)
        cache: list[Any] | None = None
        cached = 0
        prefix = admit.prefix
        if prefix is not None and self.can_reuse and prefix.handle in self.stored:
            stored, total = self.stored[prefix.handle]
            length = min(prefix.length, len(request.prompt_ids) - 1)
            if length > 0:
                parts = [cache_ops.copy_prefix(c, length, total) for c in stored]
                if all(p is not None for p in parts):
                    cache, cached = parts, length
        if self.disk is not None and self.keep_caches:
            found = self.disk.lookup(request.prompt_ids, longer_than=cached)
            if found is not None:
                parts = self.disk.load(found[0], found[1], self._n_caches)
                if parts is not None:
                    cache, cached = parts, found[1]
        if cache is None:
            cache = self._new_cache()
        self.prefilling.append(Sequence(request, cache, cached, self.vocab_size, constraint))
        return PrefillProgress(
            request_id=request.request_id, done=cached, total=len(request.prompt_ids), cached=cached
        )

    def abort(self, request_id: str) -> SequenceFinished | None:
        for seq in self.prefilling:
            if seq.rid == request_id:
                self.prefilling.remove(seq)
                return self._finished(seq, "abort", None)
        for i, seq in enumerate(self.running):
            if seq.rid == request_id:
                self._drop_rows([i])
                return self._finished(seq, "abort", None)
        return None

    def abort_all(self, reason: FinishReason = "abort") -> list[SequenceFinished]:
        seqs = [*self.prefilling, *self.running]
        self.prefilling.clear()
        self.running = []
        self.batch_cache = None
        self._pending = None
        if self.drafter is not None:
            self.drafter.clear()
        return [self._finished(s, reason, None) for s in seqs]

    def release(self, handles: Iterable[int]) -> None:
        for h in handles:
            self.stored.pop(h, None)

    # -- one step --------------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        events: list[StepEvent] = []
        self._prefill(events)
        if self.running:
            self._decode(events)
        return events

    def _prefill(self, events: list[StepEvent]) -> None:
        budget = self.prefill_chunk
        # With no row decoding, a burst of fresh prompts stalls nobody: read more of it at once.
        group = self._fresh_group(budget if self.running else BURST_FACTOR * budget)
        if len(group) > 1:
            budget -= self._prefill_group(group, events)
        while budget > 0 and self.prefilling:
            seq = self.prefilling[0]
            assert seq.cache is not None
            # Leave the last prompt token for the sampling pass, as mlx-lm does; a short rest
            # (a chat turn, the new part after a cached prefix) is read in that pass itself, as
            # mlx-lm's generate_step does: one forward and one sync instead of two each.
            todo = len(seq.prompt) - 1 - seq.prefilled
            whole = 0 < todo < min(ONE_PASS_TOKENS, budget) and (self.batchable or not self.running)
            if todo > 0 and not whole:
                n = min(budget, todo)
                chunk = mx.array([seq.prompt[seq.prefilled : seq.prefilled + n]])
                self._forward_hidden(chunk, seq.cache)
                mx.eval(cache_ops.arrays(seq.cache))
                seq.prefilled += n
                budget -= n
                events.append(
                    PrefillProgress(
                        request_id=seq.rid,
                        done=seq.prefilled,
                        total=len(seq.prompt),
                        cached=seq.cached_tokens,
                    )
                )
                if seq.prefilled < len(seq.prompt) - 1:
                    continue
            if self.running and not self.batchable:
                break  # this model decodes one request at a time: wait for the batch to end
            # Last prompt token: logits, first token, then join the decode batch.
            self.prefilling.popleft()
            rest = seq.prompt[seq.prefilled :] if whole else seq.prompt[-1:]
            budget -= len(rest)
            logits = self.model(mx.array([rest]), cache=seq.cache)[:, -1, :]
            seq.prefilled = len(seq.prompt)
            if whole:
                events.append(
                    PrefillProgress(
                        request_id=seq.rid,
                        done=seq.prefilled,
                        total=seq.prefilled,
                        cached=seq.cached_tokens,
                    )
                )
            token = self._sample_rows(logits, [seq], events)[0]
            reason = self._finish_reason(seq, token)
            if reason is not None:
                events.append(self._finished(seq, reason, seq.cache))
                continue
            self._join(seq)

    def _fresh_group(self, budget: int) -> list[Sequence]:
        """The waiting requests at the front of the queue that can be read together in one
        pass: nothing read yet but (at most) a cached prefix of under half the prompt (a
        chat template's opening, say: cheaper to read again in the batch than to read the
        rest alone) or of a short prompt (a burst of repeated short chats: one batched pass
        beats one pass per request), all of their prompts within this step's budget."""
        group: list[Sequence] = []
        if not self.batch_prefill:
            return group
        total = 0
        for seq in self.prefilling:
            n = len(seq.prompt)
            fresh = seq.prefilled == seq.cached_tokens and (
                2 * seq.cached_tokens < n or n < ONE_PASS_TOKENS
            )
            if not fresh or total + n > budget:
                break
            total += n
            group.append(seq)
        if len(group) > 1:
            for seq in group:  # their prompts are read whole, cached prefix included
                seq.prefilled = seq.cached_tokens = 0
        return group

    def _prefill_group(self, group: list[Sequence], events: list[StepEvent]) -> int:
        """Read several whole prompts in one left-padded batch (as mlx-lm's BatchGenerator
        does), sample their first tokens together and join them to the decode batch; returns
        the prompt tokens read."""
        for _ in group:
            self.prefilling.popleft()
        if self._plain:
            width = max(len(s.prompt) for s in group)
            pads = [width - len(s.prompt) for s in group]
            tokens = mx.array([[0] * p + s.prompt for p, s in zip(pads, group, strict=True)])
            cache: list[Any] = [self._batch_cache(pads) for _ in range(self._n_caches)]
            if width > 1:
                self._forward_hidden(tokens[:, :-1], cache)
            logits = self.model(tokens[:, -1:], cache=cache)[:, -1, :]
        else:
            cache = self._right_padded_prefill(group)
            last = mx.array([s.prompt[-1:] for s in group])
            logits = self.model(last, cache=cache)[:, -1, :]
        for seq in group:
            seq.prefilled = len(seq.prompt)
            seq.cache = None
            events.append(
                PrefillProgress(request_id=seq.rid, done=seq.prefilled, total=seq.prefilled)
            )
        sampled = self._sample_rows(logits, group, events)
        keep: list[int] = []
        for i, (seq, token) in enumerate(zip(group, sampled, strict=True)):
            reason = self._finish_reason(seq, token)
            if reason is None:
                keep.append(i)
                continue
            row = [c.extract(i) for c in cache] if self._keeping(seq) else None
            events.append(self._finished(seq, reason, row))
        if keep:
            if len(keep) < len(group):
                for c in cache:
                    c.filter(keep)
            self._join_rows([group[i] for i in keep], cache)
        return sum(len(s.prompt) for s in group)

    def _right_padded_prefill(self, group: list[Sequence]) -> list[Any]:
        """All but the last token of each prompt, read in one right-padded batch as mlx-lm's
        BatchGenerator does: empty caches merged into batched ones, told each row's length
        (recurrent state stops at it; a sliding window keeps the row's own last positions),
        then shifted to the left-padded form decoding uses."""
        fresh = [self._new_cache() for _ in group]
        cache = [fresh[0][i].merge([f[i] for f in fresh]) for i in range(self._n_caches)]
        lengths = [len(s.prompt) - 1 for s in group]
        width = max(lengths)
        if width == 0:
            return cache
        padding = [width - n for n in lengths]
        if max(padding) > 0:
            for c in cache:
                c.prepare(lengths=lengths, right_padding=padding)
        tokens = mx.array([s.prompt[:-1] + [0] * p for s, p in zip(group, padding, strict=True)])
        self._forward_hidden(tokens, cache)
        if max(padding) > 0:
            for c in cache:
                c.finalize()
        mx.eval(cache_ops.arrays(cache))
        return cache

    def _join_rows(self, rows: list[Sequence], cache: list[Any]) -> None:
        """Add rows whose batched caches are `cache` to the decode batch."""
        if len(rows) == 1:
            rows[0].cache = [c.extract(0) for c in cache]
            self._join(rows[0])
            return
        if self.batch_cache is None:
            self.batch_cache = cache
        else:
            if not self._batched:
                self.batch_cache = [c.merge([c]) for c in self.batch_cache]
            for mine, new in zip(self.batch_cache, cache, strict=True):
                mine.extend(new)
        self._batched = True
        self.running.extend(rows)
        if self.drafter is not None:
            self.drafter.join([s.prompt for s in rows])

    def _decode(self, events: list[StepEvent]) -> None:
        """One decode pass over the batch, kept one step ahead where it is safe.

        When every row samples without looking at its history (no penalties, no grammar, no
        logprobs), the next pass is launched (`mx.async_eval`) on this pass's tokens before
        they are read back, as mlx-lm's generators do: the device computes step n+1 while
        this thread turns step n into events. A row that finishes at step n then took part in
        step n+1 for nothing, and is dropped from it."""
        assert self.batch_cache is not None
        pending, self._pending = self._pending, None
        if pending is None and self.speculative != "off":
            drafts = self._drafts()
            if drafts is not None:
                self._speculate(*drafts, events)
                return
        if pending is None:
            inputs = mx.array([[s.generated[-1]] for s in self.running], dtype=mx.uint32)
        else:
            # The rows with an unread token are the first ones (joins are appended).
            fresh = [[s.generated[-1]] for s in self.running[len(pending) :]]
            inputs = pending[:, None]
            if fresh:
                inputs = mx.concatenate([inputs, mx.array(fresh, dtype=mx.uint32)])
        if pending is not None or self._pipelineable():
            rows = list(self.running)
            launched = self._launch(inputs, rows)
            mx.async_eval(launched)
            if pending is not None:
                # The previous pass's tokens: the caches now hold them too.
                tokens: list[int] = pending.tolist()  # type: ignore[assignment]
                self._emit(rows[: len(tokens)], tokens, events)
                keep = self._retire(rows[: len(tokens)], tokens, events, cache_has_last=True)
                if len(keep) < len(rows):
                    keep += range(len(tokens), len(rows))
                    launched = launched[mx.array(keep, dtype=mx.int32)]
            if self.running and self._pipelineable() and not self._draft_ready():
                self._pending = launched
                return
            if not self.running:
                return
            tokens = launched.tolist()  # type: ignore[assignment]
            self._emit(self.running, tokens, events)
            self._retire(list(self.running), tokens, events, cache_has_last=False)
            return
        logits = self.model(inputs, cache=self.batch_cache)[:, -1, :]
        tokens = self._sample_rows(logits, self.running, events)
        self._retire(list(self.running), tokens, events, cache_has_last=False)

    # -- speculative decoding --------------------------------------------------------------

    def _may_draft(self, seq: Sequence) -> bool:
        """Whether this row may draft this step (counting down its wait after a miss)."""
        if self.speculative == "off" or self.share_tokens is not None:
            return False  # (distributed ranks must all take the same decisions)
        sampling = seq.request.sampling
        if not seq.sampler.history_free or sampling.logprobs:
            return False
        if self.speculative == "auto" and not sampling.greedy:
            return False
        if seq.wait > 0:
            seq.wait -= 1
            return False
        return True

    def _ngrams(self, seq: Sequence) -> NgramIndex:
        index = seq.ngrams
        if index is None:
            index = seq.ngrams = NgramIndex(seq.prompt)
        seen = len(index) - len(seq.prompt)
        if seen < len(seq.generated):
            index.extend(seq.generated[seen:])
        return index

    def _drafts(self) -> tuple[list[list[int]], list[mx.array | None]] | None:
        """Each row's draft ([] for rows that do not draft) and, for rows a draft model drafts
        for by sampling, the distributions it drew them from; None when no row drafts."""
        lengths = [self._draft_length(seq) for seq in self.running]
        if self.drafter is not None:
            ready = [s for s, n in zip(self.running, lengths, strict=True) if n]
            if not self._worth_it(ready):
                return None
            texts = [(s.prompt, s.generated) for s in self.running]
            return self.drafter.propose(texts, lengths, [s.sampler for s in self.running])
        rows = zip(self.running, lengths, strict=True)
        drafts = [self._ngrams(s).draft(n) if n else [] for s, n in rows]
        ready = [s for s, d in zip(self.running, drafts, strict=True) if d]
        if not self._worth_it(ready):
            return None
        return drafts, [None] * len(drafts)

    def _draft_length(self, seq: Sequence) -> int:
        """How many tokens this row drafts this step (0: none)."""
        room = seq.request.max_tokens - len(seq.generated) - 1
        if room <= 0 or not self._may_draft(seq):
            return 0
        return min(seq.draft_len, self.draft_tokens, room)

    def _worth_it(self, ready: list[Sequence]) -> bool:
        """Whether a verification pass is worth making with these rows drafting. A lone row
        drafts whenever it can. In a batch, auto mode wants the drafts to be expected to gain
        the batch at least 3/4 of a token per row: a pass that verifies drafts costs the whole
        batch its pipelined step and more host work, which a few short drafts do not repay
        (measured on an H200, 8 chat streams with drafts in a few rows: 0.45x the speed
        without when any row drafted, 0.69x when half the rows had to)."""
        if not ready:
            return False
        if self.speculative != "auto" or len(self.running) == 1:
            return True
        return sum(s.gain for s in ready) >= 0.75 * len(self.running)

    def _draft_ready(self) -> bool:
        """Whether some row would draft now: then the pipelined pass is read at once, so that
        the next step can verify drafts."""
        if self.speculative == "off":
            return False
        if self.drafter is not None:  # a draft model always has a draft
            ready = [s for s in self.running if self._may_draft(s)]
        else:
            ready = [s for s in self.running if self._may_draft(s) and self._ngrams(s).has_draft()]
        return self._worth_it(ready)

    def _speculate(
        self, drafts: list[list[int]], dists: list[mx.array | None], events: list[StepEvent]
    ) -> None:
        """One pass over the batch that verifies every row's draft (rows without one decode
        as usual in the same pass), then each row's cache is cut back to what it kept."""
        assert self.batch_cache is not None
        rows = list(self.running)
        width = 1 + max(len(d) for d in drafts)
        inputs = []
        for seq, draft in zip(rows, drafts, strict=True):
            last = seq.generated[-1]
            inputs.append([last, *draft, *([last] * (width - 1 - len(draft)))])
        logits = self.model(mx.array(inputs, dtype=mx.uint32), cache=self.batch_cache)
        kept = [1] * len(rows)
        plain = [i for i, d in enumerate(drafts) if not d]
        if plain:
            idx = mx.array(plain, dtype=mx.int32)
            self._sample_rows(logits[idx, 0, :], [rows[i] for i in plain], events)
        drafting = [i for i, d in enumerate(drafts) if d]
        chosen = self._verify(logits, rows, drafts, dists, drafting)
        accepted = [0] * len(rows)
        for i, tokens in zip(drafting, chosen, strict=True):
            seq, draft = rows[i], drafts[i]
            self.drafted += len(draft)
            self.accepted += len(tokens) - 1
            seq.gain = 0.7 * seq.gain + 0.3 * (len(tokens) - 1)
            if len(tokens) > len(draft):
                seq.draft_len = min(self.draft_tokens, 2 * len(draft))
            else:
                seq.draft_len = max(1, len(tokens))
            if self.speculative == "auto":
                seq.misses = 0 if len(tokens) > 1 else seq.misses + 1
                seq.wait = min(1 << seq.misses, 16) - 1 if seq.misses else 0
            accepted[i] = len(tokens) - 1
            n = 0
            for token in tokens:
                n += 1
                seq.generated.append(token)
                seq.sampler.observe(token)
                if not self._is_terminal(seq, token):
                    events.append(TokenOut(request_id=seq.rid, token_id=token))
                if self._finish_reason(seq, token) is not None:
                    break
            kept[i] = n
        trim_rows(self.batch_cache, kept, width)
        if self.drafter is not None:
            # The draft cache keeps the drafts the target accepted and emitted.
            self.drafter.commit([min(a, k) for a, k in zip(accepted, kept, strict=True)])
        done: list[int] = []
        for i, seq in enumerate(rows):
            reason = self._finish_reason(seq, seq.generated[-1])
            if reason is not None:
                cache = self._row_cache(i) if self._keeping(seq) else None
                events.append(self._finished(seq, reason, cache))
                done.append(i)
        if done:
            self._drop_rows(done)

    def _verify(
        self,
        logits: mx.array,
        rows: list[Sequence],
        drafts: list[list[int]],
        dists: list[mx.array | None],
        drafting: list[int],
    ) -> list[list[int]]:
        """The tokens each drafting row emits: its accepted drafts, then one of the model's."""
        if not drafting:
            return []
        per_row: list[mx.array] = []
        for i in drafting:
            row = logits[i, : len(drafts[i]) + 1, :].astype(mx.float32)
            sampler = rows[i].sampler
            if sampler.bias_ids is not None and sampler.bias_vals is not None:
                row = row.at[:, sampler.bias_ids].add(sampler.bias_vals)
            per_row.append(row)
        greedy = [j for j, i in enumerate(drafting) if rows[i].request.sampling.greedy]
        targets: dict[int, list[int]] = {}
        if greedy:
            best = [mx.argmax(per_row[j], axis=-1) for j in greedy]
            mx.eval(best)
            targets = {j: b.tolist() for j, b in zip(greedy, best, strict=True)}  # type: ignore[misc]
        out: list[list[int]] = []
        for j, i in enumerate(drafting):
            if j in targets:
                out.append(accept_greedy(targets[j], drafts[i]))
            else:
                sampler = rows[i].sampler
                out.append(
                    accept_sampled(
                        per_row[j], drafts[i], sampler.params, sampler.next_key(), dists[i]
                    )
                )
        return out

    def _pipelineable(self) -> bool:
        return all(s.sampler.history_free and not s.request.sampling.logprobs for s in self.running)

    def _launch(self, inputs: mx.array, rows: list[Sequence]) -> mx.array:
        """The lazy tokens of one decode pass (nothing is evaluated here)."""
        assert self.batch_cache is not None
        logits = self.model(inputs, cache=self.batch_cache)[:, -1, :]
        tokens, _ = sample_batch(logits, [s.sampler for s in rows])
        if self.share_tokens is not None:
            tokens = self.share_tokens(tokens)
        return tokens

    def _emit(self, rows: list[Sequence], tokens: list[int], events: list[StepEvent]) -> None:
        for seq, token in zip(rows, tokens, strict=True):
            seq.generated.append(token)
            seq.sampler.observe(token)
            if not self._is_terminal(seq, token):
                events.append(TokenOut(request_id=seq.rid, token_id=token))

    def _retire(
        self,
        rows: list[Sequence],
        tokens: list[int],
        events: list[StepEvent],
        *,
        cache_has_last: bool,
    ) -> list[int]:
        """Finish the rows whose last token ends them (rows are the first rows of the batch);
        returns the indices of the rows kept."""
        assert self.batch_cache is not None
        done: list[int] = []
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            reason = self._finish_reason(seq, token)
            if reason is not None:
                cache = self._row_cache(i) if self._keeping(seq) else None
                events.append(self._finished(seq, reason, cache, cache_has_last=cache_has_last))
                done.append(i)
        if done:
            self._drop_rows(done)
        drop = set(done)
        return [i for i in range(len(rows)) if i not in drop]

    # -- helpers ---------------------------------------------------------------------------

    def kv_bytes(self) -> int:
        """Bytes of KV cache the requests in the engine hold (kept prompt-cache states not
        counted: the prompt cache manager accounts for those)."""
        caches = list(self.batch_cache or [])
        for seq in self.prefilling:
            caches += seq.cache or []
        total = self.drafter.nbytes if self.drafter is not None else 0
        for c in caches:
            try:
                total += int(c.nbytes)
            except (AttributeError, NotImplementedError, TypeError):
                pass
        return total

    def _new_cache(self) -> list[Any]:
        """A fresh single-sequence cache per layer (quantized under --kv-bits)."""
        caches = make_prompt_cache(self.model)
        if self.kv_bits:
            caches = quantize_caches(caches, self.kv_bits, self.kv_group_size)
        return caches

    def _batch_cache(self, pads: list[int]) -> Any:
        if self.kv_bits:
            return BatchQuantKVCache(pads, group_size=self.kv_group_size, bits=self.kv_bits)
        return BatchKVCache(pads)

    def _forward_hidden(self, chunk: mx.array, cache: list[Any]) -> None:
        """Run a prompt chunk through the layers only: its logits are never needed."""
        if self._backbone is not None:
            self._backbone(chunk, cache=cache)
        else:
            self.model(chunk, cache=cache)

    def _sample_rows(
        self, logits: mx.array, seqs: list[Sequence], events: list[StepEvent]
    ) -> list[int]:
        samplers = [s.sampler for s in seqs]
        tokens_arr, logprobs = sample_batch(logits, samplers)
        if self.share_tokens is not None:
            tokens_arr = self.share_tokens(tokens_arr)
        want = [i for i, s in enumerate(seqs) if s.request.sampling.logprobs]
        chosen = top_ids = top_vals = None
        if want:
            idx = mx.array(want, dtype=mx.int32)
            rows = logprobs[idx]
            chosen = mx.take_along_axis(rows, tokens_arr[idx][:, None].astype(mx.int32), axis=1)
            k = max(seqs[i].request.sampling.top_logprobs for i in want)
            if k > 0:
                top_ids = mx.argsort(-rows, axis=-1)[:, :k]
                top_vals = mx.take_along_axis(rows, top_ids, axis=1)
            mx.eval(tokens_arr, chosen, top_ids, top_vals)
        else:
            mx.eval(tokens_arr)
        tokens: list[int] = tokens_arr.tolist()  # type: ignore[assignment]
        chosen_l: list[list[float]] = chosen.tolist() if chosen is not None else []  # type: ignore[assignment]
        top_ids_l: list[list[int]] = top_ids.tolist() if top_ids is not None else []  # type: ignore[assignment]
        top_vals_l: list[list[float]] = top_vals.tolist() if top_vals is not None else []  # type: ignore[assignment]
        row_of = {i: j for j, i in enumerate(want)}
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            seq.generated.append(token)
            seq.sampler.observe(token)
            if self._is_terminal(seq, token):
                continue  # EOS/stop tokens end the text; they are counted, not shown
            logprob = None
            tops: tuple[TopLogprob, ...] = ()
            j = row_of.get(i)
            if j is not None:
                logprob = chosen_l[j][0]
                k = seq.request.sampling.top_logprobs
                if k and top_ids_l:
                    tops = tuple(
                        TopLogprob(token_id=t, logprob=v)
                        for t, v in zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True)
                    )
            events.append(
                TokenOut(request_id=seq.rid, token_id=token, logprob=logprob, top_logprobs=tops)
            )
        return tokens

    def _is_terminal(self, seq: Sequence, token: int) -> bool:
        return token in seq.stop_ids or (not seq.request.ignore_eos and token in self.eos_ids)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if self._is_terminal(seq, token) or seq.sampler.grammar_done:
            return "stop"
        if len(seq.generated) >= seq.request.max_tokens:
            return "length"
        return None

    def _keeping(self, seq: Sequence) -> bool:
        return self.keep_caches and self.can_reuse and len(seq.prompt) > 1

    def _join(self, seq: Sequence) -> None:
        """Add a row to the decode batch. A row alone keeps its own single-sequence cache (the
        batched cache's padding and masks cost a lone stream a third of its speed on a GPU);
        a second row turns the batch into batched caches."""
        assert seq.cache is not None
        cache, seq.cache = seq.cache, None
        if self.batch_cache is None:
            self.batch_cache = cache
            self._batched = False
        else:
            if not self._batched:
                self.batch_cache = [c.merge([c]) for c in self.batch_cache]
                self._batched = True
            for mine, new in zip(self.batch_cache, cache, strict=True):
                mine.extend(new.merge([new]))
        self.running.append(seq)
        if self.drafter is not None:
            self.drafter.join([seq.prompt])

    def _row_cache(self, i: int) -> list[Any]:
        """Row i's cache on its own (for the prompt cache)."""
        assert self.batch_cache is not None
        if not self._batched:
            return list(self.batch_cache)
        return [c.extract(i) for c in self.batch_cache]

    def _drop_rows(self, rows: list[int]) -> None:
        drop = set(rows)
        keep = [i for i in range(len(self.running)) if i not in drop]
        if self._pending is not None:
            kept = [i for i in keep if i < len(self._pending)]
            self._pending = self._pending[mx.array(kept, dtype=mx.int32)] if kept else None
        self.running = [self.running[i] for i in keep]
        if self.drafter is not None:
            self.drafter.keep(keep)
        if not keep:
            self.batch_cache = None
        elif self.batch_cache is not None:
            for c in self.batch_cache:
                c.filter(keep)
            if len(keep) == 1:
                # Alone again: back to its own single-sequence cache.
                self.batch_cache = [c.extract(0) for c in self.batch_cache]
                self._batched = False

    def _finished(
        self,
        seq: Sequence,
        reason: FinishReason,
        cache: list[Any] | None,
        *,
        cache_has_last: bool = False,
    ) -> SequenceFinished:
        stored = None
        if cache is not None and self._keeping(seq) and reason != "abort":
            # The cache holds the prompt and every generated token but the last (which it
            # holds too when the next pass was launched ahead).
            kept = seq.generated if cache_has_last else seq.generated[:-1]
            token_ids = (*seq.prompt, *kept)
            handle = self._next_handle
            self._next_handle += 1
            # Evaluate now: an unevaluated row slice keeps the whole batch's KV arrays alive.
            mx.eval(cache_ops.arrays(cache))
            self.stored[handle] = (cache, len(token_ids))
            if self.disk is not None:
                self.disk.put(token_ids, cache)
            nbytes = sum(int(c.nbytes) for c in cache)
            stored = StoredCache(
                handle=handle,
                token_ids=token_ids,
                nbytes=nbytes,
                cuttable=cache_ops.cuttable(cache),
            )
        seq.cache = None
        return SequenceFinished(
            request_id=seq.rid,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            cached_tokens=seq.cached_tokens,
            completion_tokens=len(seq.generated),
            stored=stored,
        )
