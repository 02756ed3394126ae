"""Vision-language models inside the batch engine: image rows beside text rows.

`engine.vision` runs a VLM's prompt preparation and language model; this module fits that into
the server's pieces:

- `PromptKeys` (any thread but the executor's): a rendered prompt with its images -> the token
  ids the engine will read, with each image's tokens replaced by negative ids derived from its
  content hash (`vision.image_cache_key`). Those ids are the request's `prompt_ids`: the
  scheduler's context check and the prompt-prefix cache see image tokens keyed by content, so a
  follow-up turn about the same screenshot reuses the stored KV state. It uses its own copy of
  the processor's tokenizer (Hugging Face's fast tokenizers must not be entered from two
  threads at once).
- `VisionBatchEngine` (the executor thread): a `BatchEngine` whose model is the VLM's language
  model. At admission an image request runs the processor and the vision encoder
  (`vision.prepare_vision_prompt`, from the cached prefix on: an image wholly inside the cached
  prefix is not encoded again); its prompt is then read in the engine's own prefill chunks,
  between decode steps of the other rows, except that each chunk reads the merged embeddings
  (image features in place) at the prompt's own multimodal positions. The row then joins the
  decode batch like any other. Qwen-VL's multimodal RoPE places a row's later positions at
  `cache offset + rope_delta`: each decode pass looks its rows' deltas up, so text rows
  (delta 0) and image rows decode in one pass.

Speculative decoding is off for VLMs (the view is not an `nn.Module`), and fresh prompts are
read one by one (`batched_prefill = False`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx

from ..messages import Admit, FinishReason, PrefillProgress, SequenceFinished
from . import vision
from .batch import BatchEngine
from .batch import Sequence as Row
from .images import DecodedImage, ImageError

log = logging.getLogger(__name__)


class PromptKeys:
    """Token ids (prefix-cache keys) of vision prompts, without pixels or MLX."""

    def __init__(self, vm: vision.VisionModel) -> None:
        self.vm = vm
        self._tokenizer = copy.deepcopy(vm.tokenizer)
        self._lock = threading.Lock()  # worker threads share this copy

    def key(
        self, prompt: str, images: Sequence[DecodedImage], params: Sequence[str] = ()
    ) -> tuple[int, ...]:
        """What `prepare_vision_prompt(vm, prompt, images).cache_key` will be (the executor
        checks that it is). An image the processor refuses is a 400 naming its `params`
        entry."""
        from mlx_vlm.utils import should_add_special_tokens

        vm = self.vm
        vision.check_placeholders(vm, prompt, len(images))
        fixed = getattr(vm.processor, "full_image_sequence", None)
        pieces = prompt.split(vm.image_marker)
        text = pieces[0]
        for i, (im, piece) in enumerate(zip(images, pieces[1:], strict=True)):
            if isinstance(fixed, str):
                text += fixed + piece
                continue
            try:
                count = vision.count_image_tokens(vm, im.width, im.height)
            except ImageError as e:
                param = params[i] if i < len(params) else None
                raise ImageError(str(e), code=e.code or "invalid_image", param=param) from None
            text += vm.image_marker * count + piece
        add = should_add_special_tokens(vm.model_type, vm.processor)
        with self._lock:
            encoded = self._tokenizer(text, add_special_tokens=add).input_ids
        ids = [int(t) for t in encoded]
        return vision.image_cache_key(ids, vm.image_token_id, [im.digest for im in images])


class _RowView(vision.LanguageModelView):
    """The language model as the batch engine calls it: a call on the cache of an image row
    still reading its prompt reads that row's merged embeddings; any other call decodes with
    its rows' rope deltas."""

    batched_prefill = False

    def __init__(self, vm: vision.VisionModel, engine: VisionBatchEngine) -> None:
        super().__init__(vm)
        self._engine = engine

    def __call__(  # type: ignore[override]
        self, inputs: mx.array, cache: list[Any] | None = None, **_: Any
    ) -> mx.array:
        if cache is None:
            cache = self.vm.make_cache()
        reading = self._engine.reading(cache)
        if reading is not None:
            return reading.read(self.vm, inputs.shape[1])
        deltas = self._engine.deltas(cache) if self.vm.mrope else None
        return vision.forward(self.vm, inputs, cache, rope_deltas=deltas)

    def parameters(self) -> Any:
        return self.vm.model.parameters()


@attrs.define(eq=False)
class _Reading:
    """An image row reading its prompt: its cache and its prepared prompt, read so far up to
    prompt position `at` (the engine reads it in its prefill chunks, like any prompt)."""

    cache: list[Any]
    prompt: vision.VisionPrompt
    at: int

    def read(self, vm: vision.VisionModel, n: int) -> mx.array:
        """The next `n` prompt positions into the cache; their logits."""
        vp, a = self.prompt, self.at - self.prompt.start
        if a + n > vp.embeddings.shape[1]:
            raise ValueError("read past the end of the vision prompt")
        pos = vp.position_ids
        logits = vision.forward(
            vm,
            mx.array(vp.input_ids[self.at : self.at + n])[None],
            self.cache,
            embeddings=vp.embeddings[:, a : a + n],
            position_ids=None if pos is None else pos[..., a : a + n],
            extra=vp.extra,
        )
        self.at += n
        return logits


class VisionBatchEngine(BatchEngine):
    """`BatchEngine` over a VLM: image rows are read through the vision encoder."""

    def __init__(self, vm: vision.VisionModel, **kwargs: Any) -> None:
        self.vm = vm
        self._row_deltas: dict[str, int] = {}
        self._reading: dict[str, _Reading] = {}
        if kwargs.get("kv_bits"):  # untested with mlx-vlm's attention: not offered yet
            log.warning("--kv-bits ignored: vision models keep a full-precision KV cache")
            kwargs["kv_bits"] = 0
        super().__init__(_RowView(vm, self), **kwargs)  # type: ignore[arg-type]

    def deltas(self, cache: list[Any]) -> list[int] | None:
        """The rope deltas of the rows a decode pass over `cache` runs (None: all 0)."""
        if cache is self.batch_cache:
            return [self._row_deltas.get(s.rid, 0) for s in self.running]
        return None  # a text row reading its prompt: delta 0

    def reading(self, cache: list[Any]) -> _Reading | None:
        for r in self._reading.values():
            if r.cache is cache:
                return r
        return None

    def admit(self, admit: Admit) -> PrefillProgress:
        """Queue the request; for an image request, run the processor and the vision encoder
        now (from the cached prefix on) and read the prompt in the prefill chunks."""
        progress = super().admit(admit)
        request = admit.request
        if request.vision is None:
            return progress
        seq = self.prefilling[-1]
        assert seq.cache is not None
        try:
            vp = vision.prepare_vision_prompt(
                self.vm, request.vision.text, request.vision.images, start=seq.prefilled
            )
            if vp.cache_key != tuple(seq.prompt):
                raise ValueError("the vision prompt does not match its tokenized form")
        except BaseException:
            self.prefilling.pop()
            raise
        self._row_deltas[seq.rid] = vp.rope_delta
        self._reading[seq.rid] = _Reading(cache=seq.cache, prompt=vp, at=seq.prefilled)
        return progress

    def _forward_hidden(self, chunk: mx.array, cache: list[Any]) -> None:
        reading = self.reading(cache)
        if reading is None:
            super()._forward_hidden(chunk, cache)
        else:
            reading.read(self.vm, chunk.shape[1])

    def _join(self, seq: Row) -> None:
        self._reading.pop(seq.rid, None)
        super()._join(seq)

    def _finished(
        self,
        seq: Row,
        reason: FinishReason,
        cache: list[Any] | None,
        *,
        cache_has_last: bool = False,
    ) -> SequenceFinished:
        self._row_deltas.pop(seq.rid, None)
        self._reading.pop(seq.rid, None)
        return super()._finished(seq, reason, cache, cache_has_last=cache_has_last)
