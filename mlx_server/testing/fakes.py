"""Fakes for testing the actors without a model or a GPU.

`FakeExecutor` stands in for `actors.executor.Executor`: the scheduler sends it commands through
`send`, exactly as it would the real one, and the test decides what each executor step produces
(`emit_tokens`, `finish`, `fail`, ...). It keeps the real executor's bookkeeping where the rest of
the server depends on it: an `Admit` reports prefill progress, an `Abort` of a live request ends it
with `SequenceFinished(finish_reason="abort")` and honest counts, terminal tokens (EOS, stop token
ids) end a request without a `TokenOut`, `max_tokens` ends it with "length", and a natural finish
hands back a `StoredCache` that `ReleaseCache` frees again.

`tiny_tokenizer` builds a real byte-level BPE `Tokenizer` in memory, so streaming detokenization
(including characters split across byte tokens) runs for real.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from ..engine.tokenizer import Tokenizer
from ..messages import (
    Abort,
    Admit,
    ExecutorCommand,
    FinishReason,
    GenerationRequest,
    PrefillProgress,
    ReleaseCache,
    SequenceFailed,
    SequenceFinished,
    Shutdown,
    StepOutput,
    StoredCache,
    TokenOut,
)

if TYPE_CHECKING:
    from ..engine.model import LoadedModel

StepEvent = TokenOut | PrefillProgress | SequenceFinished | SequenceFailed

__all__ = [
    "EOS_TOKEN",
    "TINY_WORDS",
    "FakeExecutor",
    "FakeSequence",
    "fake_loaded_model",
    "tiny_tokenizer",
]


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------


@attrs.define(eq=False)
class FakeSequence:
    """A request the fake executor is working on."""

    request: GenerationRequest
    cached_tokens: int
    generated: list[int] = attrs.field(factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id


class FakeExecutor:
    """A deterministic, test-driven executor.

    Wire it like the real one: pass `fake.send` to the `Scheduler` and `CacheManager`, and set
    `on_output` to `scheduler.on_executor_output`. Replies to commands (the prefill progress of an
    admit, the end of an aborted request) are delivered at once, synchronously, from `send`; the
    real executor delivers them a little later, which is one of the orders it may take anyway.
    Each driving method delivers one `StepOutput` and returns it.
    """

    def __init__(
        self,
        on_output: Callable[[StepOutput], None] | None = None,
        *,
        eos_token_ids: Iterable[int] = (),
        keep_caches: bool = True,
        bytes_per_token: int = 100,
    ) -> None:
        self.on_output = on_output
        self.eos_token_ids = frozenset(eos_token_ids)
        self.keep_caches = keep_caches
        self.bytes_per_token = bytes_per_token
        self.commands: list[ExecutorCommand] = []
        self.outputs: list[StepOutput] = []
        self.active: dict[str, FakeSequence] = {}
        self.stored: dict[int, tuple[int, ...]] = {}
        self.shut_down = False
        self._next_handle = 1

    # -- the Executor interface ------------------------------------------------------------

    def send(self, command: ExecutorCommand) -> None:
        """Record a command and apply it as the real executor would."""
        self.commands.append(command)
        if isinstance(command, Admit):
            self._admit(command)
        elif isinstance(command, Abort):
            seq = self.active.pop(command.request_id, None)
            if seq is not None:
                self._post([self._finished(seq, "abort", store=False)])
        elif isinstance(command, ReleaseCache):
            for handle in command.handles:
                self.stored.pop(handle, None)
        elif isinstance(command, Shutdown):
            self.shut_down = True
            ended = [self._finished(s, "abort", store=False) for s in self.active.values()]
            self.active.clear()
            if ended:
                self._post(ended, batch_size=0)
        else:  # pragma: no cover - guards against new command types
            raise TypeError(f"FakeExecutor cannot handle {command!r}")

    # -- what the test inspects ------------------------------------------------------------

    @property
    def admits(self) -> list[Admit]:
        return [c for c in self.commands if isinstance(c, Admit)]

    @property
    def admitted_ids(self) -> list[str]:
        """Request ids in the order they were admitted."""
        return [a.request.request_id for a in self.admits]

    @property
    def aborted_ids(self) -> list[str]:
        """Request ids of every Abort received (live or not, duplicates included)."""
        return [c.request_id for c in self.commands if isinstance(c, Abort)]

    @property
    def released_handles(self) -> list[int]:
        return [h for c in self.commands if isinstance(c, ReleaseCache) for h in c.handles]

    @property
    def running_ids(self) -> list[str]:
        return list(self.active)

    # -- driving steps ---------------------------------------------------------------------

    def emit_tokens(self, tokens: Mapping[str, int | Iterable[int]]) -> StepOutput:
        """One decode step: each request generates the given token (or tokens, in order).

        As in the real engine, an EOS or stop token id ends the request with "stop" and is
        counted but not emitted, and reaching `max_tokens` ends it with "length"."""
        events: list[StepEvent] = []
        for rid, toks in tokens.items():
            seq = self._live(rid)
            for token in [toks] if isinstance(toks, int) else list(toks):
                if rid not in self.active:
                    raise AssertionError(f"request {rid!r} already finished in this step")
                seq.generated.append(token)
                reason: FinishReason | None = None
                if self._is_terminal(seq, token):
                    reason = "stop"
                else:
                    events.append(TokenOut(request_id=rid, token_id=token))
                    if len(seq.generated) >= seq.request.max_tokens:
                        reason = "length"
                if reason is not None:
                    del self.active[rid]
                    events.append(self._finished(seq, reason))
        return self._post(events)

    def emit_text(self, tokenizer: Tokenizer, texts: Mapping[str, str]) -> StepOutput:
        """One step in which each request generates the tokens of the given text."""
        return self.emit_tokens({rid: tokenizer.encode(text) for rid, text in texts.items()})

    def progress(self, request_id: str, done: int) -> StepOutput:
        """One prefill chunk of a request's prompt was processed."""
        seq = self._live(request_id)
        event = PrefillProgress(
            request_id=request_id,
            done=done,
            total=len(seq.request.prompt_ids),
            cached=seq.cached_tokens,
        )
        return self._post([event])

    def finish(
        self, request_id: str, reason: FinishReason = "stop", *, store: bool | None = None
    ) -> StepOutput:
        """End a request. `store` (default: keep_caches, unless aborted) says whether a
        `StoredCache` comes back for the cache manager."""
        seq = self._live(request_id)
        del self.active[request_id]
        return self._post([self._finished(seq, reason, store=store)])

    def fail(self, request_id: str, message: str = "boom") -> StepOutput:
        """The executor raised while working on a request."""
        self._live(request_id)
        del self.active[request_id]
        return self._post([SequenceFailed(request_id=request_id, message=message)])

    def step(self, *events: StepEvent) -> StepOutput:
        """Deliver arbitrary events as one step (no bookkeeping: the test is on its own)."""
        return self._post(list(events))

    # -- internals -------------------------------------------------------------------------

    def _admit(self, command: Admit) -> None:
        request = command.request
        rid = request.request_id
        if rid in self.active:
            raise AssertionError(f"request {rid!r} admitted twice")
        cached = 0
        prefix = command.prefix
        if prefix is not None and prefix.handle in self.stored:
            # Same rule as BatchEngine.admit: the last prompt token is always recomputed.
            cached = max(0, min(prefix.length, len(request.prompt_ids) - 1))
        self.active[rid] = FakeSequence(request=request, cached_tokens=cached)
        progress = PrefillProgress(
            request_id=rid, done=cached, total=len(request.prompt_ids), cached=cached
        )
        self._post([progress])

    def _live(self, request_id: str) -> FakeSequence:
        try:
            return self.active[request_id]
        except KeyError:
            raise AssertionError(
                f"request {request_id!r} is not running in the fake executor "
                f"(running: {sorted(self.active)})"
            ) from None

    def _is_terminal(self, seq: FakeSequence, token: int) -> bool:
        request = seq.request
        return token in request.stop_token_ids or (
            not request.ignore_eos and token in self.eos_token_ids
        )

    def _finished(
        self, seq: FakeSequence, reason: FinishReason, *, store: bool | None = None
    ) -> SequenceFinished:
        prompt = seq.request.prompt_ids
        if store is None:
            store = self.keep_caches and reason != "abort" and len(prompt) > 1
        stored = None
        if store:
            # Like the real cache: the prompt and every generated token but the last.
            token_ids = (*prompt, *seq.generated[:-1])
            handle = self._next_handle
            self._next_handle += 1
            self.stored[handle] = token_ids
            stored = StoredCache(
                handle=handle, token_ids=token_ids, nbytes=len(token_ids) * self.bytes_per_token
            )
        return SequenceFinished(
            request_id=seq.request_id,
            finish_reason=reason,
            prompt_tokens=len(prompt),
            cached_tokens=seq.cached_tokens,
            completion_tokens=len(seq.generated),
            stored=stored,
        )

    def _post(self, events: Sequence[StepEvent], *, batch_size: int | None = None) -> StepOutput:
        output = StepOutput(
            events=tuple(events),
            batch_size=len(self.active) if batch_size is None else batch_size,
        )
        self.outputs.append(output)
        if self.on_output is None:
            raise RuntimeError("FakeExecutor.on_output is not set (scheduler.on_executor_output)")
        self.on_output(output)
        return output


# --------------------------------------------------------------------------------------------
# A tiny real tokenizer
# --------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
TINY_WORDS = ("Hello", " world", " stop", " the", "ing", "!", " caf", " STOP")
"""Whole-word tokens of the tiny tokenizer; any other text falls back to one token per byte,
so "é" takes two tokens and "🙂" four."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def tiny_tokenizer(words: Iterable[str] = TINY_WORDS) -> Tokenizer:
    """A byte-level BPE tokenizer built in memory: ids 0-255 are the bytes, then one token per
    word of `words` (with the merges leading to it), then the special tokens, EOS among them."""
    byte_char = _bytes_to_unicode()
    vocab: dict[str, int] = {byte_char[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [byte_char[b] for b in word.encode("utf-8")]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in vocab:
                merges.append((current, piece))
                vocab[merged] = len(vocab)
            current = merged
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # type: ignore[assignment]
    backend.decoder = decoders.ByteLevel()  # type: ignore[assignment]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    eos = backend.token_to_id(EOS_TOKEN)
    assert eos is not None
    return Tokenizer(backend=backend, eos_token_ids=frozenset({eos}), eos_token=EOS_TOKEN)


def fake_loaded_model(
    tokenizer: Tokenizer | None = None,
    *,
    name: str = "tiny-fake",
    config: dict[str, Any] | None = None,
) -> LoadedModel:
    """A `LoadedModel` with no weights, enough for `Frontend` (prompt rendering, tokenizing and
    streams) in front of a `FakeExecutor`."""
    from ..engine.chat_template import CHATML_TEMPLATE, ChatTemplate
    from ..engine.model import LoadedModel

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    return LoadedModel(
        name=name,
        model=None,  # type: ignore[arg-type]  # never called: the executor is fake
        tokenizer=tok,
        template=ChatTemplate(CHATML_TEMPLATE, eos_token=tok.eos_token),
        config=dict(config or {}),
        source="fake",
    )
