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
  model. An image request's prompt, up to its last token, is read at admission through the
  vision encoder (`vision.prepare_vision_prompt`, from the cached prefix on) in prefill chunks;
  the last token (always text) is then read by the engine's own sampling pass and the row joins
  the decode batch like any other. Qwen-VL's multimodal RoPE places a row's later positions at
  `cache offset + rope_delta`: each row's delta is looked up by the batch's rows at every call,
  so text rows (delta 0) and image rows decode in one pass.

Speculative decoding is off for VLMs (the view is not an `nn.Module`), and fresh prompts are
read one by one (`batched_prefill = False`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from ..messages import Admit, FinishReason, PrefillProgress, SequenceFinished, VisionInput
from . import vision
from .batch import BatchEngine
from .batch import Sequence as Row
from .images import DecodedImage


class PromptKeys:
    """Token ids (prefix-cache keys) of vision prompts, without pixels or MLX."""

    def __init__(self, vm: vision.VisionModel) -> None:
        self.vm = vm
        self._tokenizer = copy.deepcopy(vm.tokenizer)

    def key(self, prompt: str, images: Sequence[DecodedImage]) -> tuple[int, ...]:
        """What `prepare_vision_prompt(vm, prompt, images).cache_key` will be (the executor
        checks that it is)."""
        from mlx_vlm.utils import should_add_special_tokens

        vm = self.vm
        vision.check_placeholders(vm, prompt, len(images))
        fixed = getattr(vm.processor, "full_image_sequence", None)
        pieces = prompt.split(vm.image_marker)
        text = pieces[0]
        for im, piece in zip(images, pieces[1:], strict=True):
            if isinstance(fixed, str):
                text += fixed + piece
            else:
                count = vision.count_image_tokens(vm, im.width, im.height)
                text += vm.image_marker * count + piece
        add = should_add_special_tokens(vm.model_type, vm.processor)
        ids = [int(t) for t in self._tokenizer(text, add_special_tokens=add).input_ids]
        return vision.image_cache_key(ids, vm.image_token_id, [im.digest for im in images])


class _RowView(vision.LanguageModelView):
    """The language model as the batch engine calls it, with each call's rows' rope deltas."""

    batched_prefill = False

    def __init__(
        self, vm: vision.VisionModel, deltas: Callable[[list[Any]], list[int] | None]
    ) -> None:
        super().__init__(vm)
        self._deltas = deltas

    def __call__(  # type: ignore[override]
        self, inputs: mx.array, cache: list[Any] | None = None, **_: Any
    ) -> mx.array:
        if cache is None:
            cache = self.vm.make_cache()
        deltas = self._deltas(cache) if self.vm.mrope else None
        return vision.forward(self.vm, inputs, cache, rope_deltas=deltas)

    def parameters(self) -> Any:
        return self.vm.model.parameters()


class VisionBatchEngine(BatchEngine):
    """`BatchEngine` over a VLM: image rows are read through the vision encoder."""

    def __init__(self, vm: vision.VisionModel, **kwargs: Any) -> None:
        self.vm = vm
        self._row_deltas: dict[str, int] = {}
        # Rows between their image prefill and joining the batch: their own cache list.
        self._solo: dict[str, tuple[list[Any], int]] = {}
        super().__init__(_RowView(vm, self._deltas_for), **kwargs)  # type: ignore[arg-type]

    def _deltas_for(self, cache: list[Any]) -> list[int] | None:
        if cache is self.batch_cache:
            return [self._row_deltas.get(s.rid, 0) for s in self.running]
        for own, delta in self._solo.values():
            if own is cache:
                return [delta]
        return None  # a text row reading its prompt: delta 0

    def admit(self, admit: Admit) -> PrefillProgress:
        progress = super().admit(admit)
        request = admit.request
        if request.vision is None:
            return progress
        seq = self.prefilling[-1]
        try:
            self._read_images(seq, request.vision)
        except BaseException:
            self.prefilling.pop()
            self._forget(seq.rid)
            raise
        return PrefillProgress(
            request_id=seq.rid,
            done=seq.prefilled,
            total=len(seq.prompt),
            cached=seq.cached_tokens,
        )

    def _read_images(self, seq: Row, inputs: VisionInput) -> None:
        """Everything but the prompt's last token, from the cached prefix on, into the row's
        cache (the encoder runs only if an image lies after the cached prefix)."""
        assert seq.cache is not None
        start = seq.prefilled
        vp = vision.prepare_vision_prompt(self.vm, inputs.text, inputs.images, start=start)
        if vp.cache_key != tuple(seq.prompt):
            raise ValueError("the vision prompt does not match its tokenized form")
        stop = len(seq.prompt) - 1
        ids = mx.array(vp.input_ids[start:stop])[None]
        total, done = stop - start, 0
        chunk = max(1, self.prefill_chunk)
        while done < total:
            n = min(chunk, total - done)
            pos = vp.position_ids
            vision.forward(
                self.vm,
                ids[:, done : done + n],
                seq.cache,
                embeddings=vp.embeddings[:, done : done + n],
                position_ids=None if pos is None else pos[..., done : done + n],
                extra=vp.extra,
            )
            mx.eval([c.state for c in seq.cache])
            done += n
        seq.prefilled = stop
        self._row_deltas[seq.rid] = vp.rope_delta
        self._solo[seq.rid] = (seq.cache, vp.rope_delta)

    def _forget(self, rid: str) -> None:
        self._row_deltas.pop(rid, None)
        self._solo.pop(rid, None)

    def _join(self, seq: Row) -> None:
        self._solo.pop(seq.rid, None)
        super()._join(seq)

    def _finished(
        self,
        seq: Row,
        reason: FinishReason,
        cache: list[Any] | None,
        *,
        cache_has_last: bool = False,
    ) -> SequenceFinished:
        self._forget(seq.rid)
        return super()._finished(seq, reason, cache, cache_has_last=cache_has_last)
