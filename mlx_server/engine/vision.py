"""Vision-language checkpoints through mlx-vlm, in the executor's terms: plain synchronous MLX
code (no trio, no quart) that only the executor thread calls.

mlx-vlm supplies the model classes, the image processor and the vision encoder; this module
turns one prompt + its images into what the language model reads (`VisionPrompt`: the token
ids with image tokens expanded, the merged input embeddings, the multimodal RoPE positions) and
runs the language model over mlx-lm KV caches (`KVCache` per request, `BatchKVCache` for a
batch), so image rows can share decode steps with text rows.

mlx-vlm's own `generate_step` keeps the multimodal RoPE offset (`_rope_deltas`) on the model
object between calls, which is wrong as soon as two requests interleave. Here positions are
always passed explicitly: prefill slices the prompt's own (3, 1, L) position ids, and decoding
computes `cache offset + rope_delta` per row, where `rope_delta` (0 for text-only prompts)
travels with the request. With the same inputs the language model then computes exactly what
mlx-vlm's generation computes, which the tests check token for token.

Supported families: those with Qwen-VL's prompt and RoPE scheme (`SUPPORTED_TYPES`). Other
checkpoints mlx-vlm knows are recognised (`is_vision_config`) but refused with a clear error.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import mlx.core as mx

from ..errors import InvalidRequest, ModelLoadError
from .images import DecodedImage, ImageError

if TYPE_CHECKING:
    from PIL.Image import Image


@attrs.frozen
class _Family:
    placeholder: str
    """What the chat template writes where an image goes."""
    marker: str
    """The part of it that occurs exactly once per image (counted to match images)."""
    mrope: bool
    """Multimodal RoPE: positions are not cache offsets and travel with the prompt."""


_QWEN = _Family("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>", mrope=True)
_FAMILIES = {
    # One image-pad token per merged 2x2 patch group, sizes follow the image; multimodal RoPE.
    # Qwen3-VL adds "deepstack" features into the first layers at the image positions.
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    # A fixed number of soft tokens per image (256 in the real models), plain RoPE, sliding-
    # window layers (rotating caches) between global ones.
    "gemma3": _Family("<start_of_image>", "<start_of_image>", mrope=False),
}

SUPPORTED_TYPES = frozenset(_FAMILIES)
"""mlx-vlm model types this module runs."""

_NOT_FORWARDED = ("inputs_embeds", "position_ids", "rope_deltas", "attention_mask_4d")
"""Embedding outputs not passed on as language-model inputs: the first three are handled
explicitly; Gemma 3's (L x L) mask is not read by mlx-vlm's language model at all."""


def is_vision_config(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's config.json describes a vision-language model mlx-vlm can build:
    a `vision_config` and a `model_type` mlx-vlm has a package for. Does not import mlx-vlm."""
    if not isinstance(config.get("vision_config"), Mapping):
        return False
    model_type = str(config.get("model_type") or "").lower()
    if not model_type.replace("_", "").isalnum():
        return False
    spec = importlib.util.find_spec("mlx_vlm")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(root) / "models" / model_type / "__init__.py").is_file()
        for root in spec.submodule_search_locations
    )


def is_vision_checkpoint(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_vision_config(config)


@attrs.define(eq=False)
class VisionModel:
    """A loaded VLM: mlx-vlm's model and processor plus what the server needs to know."""

    model: Any
    """mlx-vlm's `Model` (an `nn.Module`; typed loosely, as mlx-vlm ships no stubs)."""
    processor: Any
    model_type: str
    image_token_id: int
    image_placeholder: str
    """The text a prompt carries where one image goes (the chat template emits it)."""
    image_marker: str
    """The part of the placeholder that occurs once per image."""
    mrope: bool
    eos_token_ids: tuple[int, ...]

    @property
    def language_model(self) -> Any:
        return self.model.language_model

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def num_layers(self) -> int:
        return len(self.language_model.layers)

    def make_cache(self) -> list[Any]:
        """A fresh single-sequence mlx-lm cache, one per layer, of the kinds the language
        model asks for (full `KVCache`, or `RotatingKVCache` for sliding-window layers), so
        the engine's cache handling (merging into batches, prefix reuse) applies unchanged."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        own = getattr(self.language_model, "make_cache", None)
        if own is None:
            return [KVCache() for _ in range(self.num_layers)]
        caches: list[Any] = []
        for c in own():
            kind = type(c).__name__
            if kind == "KVCache":
                caches.append(KVCache())
            elif kind == "RotatingKVCache":
                caches.append(RotatingKVCache(max_size=c.max_size, keep=c.keep))
            else:
                raise ModelLoadError(f"vision model cache kind {kind} is not supported")
        return caches


def load_vision_model(model_dir: Path, *, max_image_pixels: int | None = None) -> VisionModel:
    """Load a local mlx-vlm checkpoint directory (nothing is fetched from the hub).

    `max_image_pixels` lowers the processor's resizing bound (Qwen2.5-VL's own is 12.8
    megapixels, ~16k image tokens): images larger than that are scaled down before the encoder,
    which bounds every image's token count (`count_image_tokens` follows it). Fixed-size
    encoders (Gemma 3) ignore it."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {e}") from e
    if not is_vision_config(config):
        raise ModelLoadError(f"{model_dir} is not a vision-language checkpoint mlx-vlm knows")
    from mlx_vlm.utils import get_model_type, load

    model_type = get_model_type(config) or ""
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"vision model type {model_type!r} is not supported yet "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
        )
    try:
        model, processor = load(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load vision model {model_dir}: {e}") from e
    if max_image_pixels is not None:
        _bound_pixels(processor.image_processor, max_image_pixels)
    image_token_id: Any = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_index", None)
    if not isinstance(image_token_id, int):
        raise ModelLoadError(f"{model_dir}/config.json names no image token id")
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    tok_eos = getattr(processor.tokenizer, "eos_token_id", None)
    if tok_eos is not None and tok_eos not in eos_ids:
        eos_ids = (*eos_ids, int(tok_eos))
    family = _FAMILIES[model_type]
    vm = VisionModel(
        model=model,
        processor=processor,
        model_type=model_type,
        image_token_id=image_token_id,
        image_placeholder=family.placeholder,
        image_marker=family.marker,
        mrope=family.mrope,
        eos_token_ids=eos_ids,
    )
    vm.make_cache()  # refuses cache kinds we cannot hold now, not at the first request
    return vm


@attrs.frozen(kw_only=True)
class VisionPrompt:
    """One prompt ready for prefill. `embeddings` and `position_ids` cover tokens
    `start:` (the part not already in the request's cache)."""

    input_ids: tuple[int, ...]
    """The whole prompt, each image placeholder expanded to its image tokens."""
    cache_key: tuple[int, ...]
    """`input_ids` with every image token replaced by a negative id derived from its image's
    content hash and its index in the image: the key for the prompt-prefix cache."""
    image_digests: tuple[str, ...]
    image_tokens: int
    start: int
    embeddings: mx.array = attrs.field(eq=False, repr=False)
    """(1, len(input_ids) - start, hidden) input embeddings, image features merged in."""
    position_ids: mx.array | None = attrs.field(eq=False, repr=False)
    """(3, 1, len(input_ids) - start) multimodal RoPE positions (None: plain RoPE)."""
    rope_delta: int
    """Position of the next token minus its index: decoding positions are offset + rope_delta."""
    extra: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    """Further language-model inputs for prefill, over the whole prompt (the model slices them
    at its cache offset): Qwen3-VL's image-position mask and deepstack features."""

    @property
    def new_tokens(self) -> int:
        """Tokens prefill reads (the prompt after the cached `start`)."""
        return len(self.input_ids) - self.start


def render_messages(vm: VisionModel, messages: Sequence[Mapping[str, Any]]) -> str:
    """The checkpoint's own chat template over messages whose content may hold
    {"type": "image"} parts (one placeholder per image, in order)."""
    return vm.tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True
    )


def prepare_vision_prompt(
    vm: VisionModel,
    prompt: str,
    images: Sequence[DecodedImage | Image],
    *,
    start: int = 0,
) -> VisionPrompt:
    """Run the processor (tokenize, expand image placeholders, resize and normalise pixels)
    and, unless every image token lies inside the first `start` (cached) tokens, the vision
    encoder; merge the image features into the embeddings. MLX work: executor thread only.

    `prompt` must hold exactly one `vm.image_placeholder` (`vm.image_marker`) per image."""
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    pictures = [im.image if isinstance(im, DecodedImage) else im for im in images]
    digests = tuple(im.digest if isinstance(im, DecodedImage) else _digest(im) for im in images)
    check_placeholders(vm, prompt, len(pictures))
    try:
        inputs = prepare_inputs(
            vm.processor,
            images=pictures or None,
            prompts=prompt,
            image_token_index=vm.image_token_id,
            add_special_tokens=should_add_special_tokens(vm.model_type, vm.processor),
        )
    except ValueError as e:
        # The processor's own refusals (Qwen: an aspect ratio over 200:1) are the client's.
        raise _unprocessable(e) from None
    input_ids: Any = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    extra = {
        k: v
        for k, v in inputs.items()
        if k not in ("input_ids", "pixel_values", "attention_mask") and v is not None
    }
    ids: list[int] = [int(t) for t in input_ids[0].tolist()]
    if not 0 <= start < len(ids):
        raise ValueError(f"start {start} outside a prompt of {len(ids)} tokens")
    image_positions = [i for i, t in enumerate(ids) if t == vm.image_token_id]
    pixel_values = inputs.get("pixel_values")
    lm: Any = vm.language_model
    position_ids: Any = None
    deltas: Any = None
    if pictures and image_positions and image_positions[-1] >= start:
        out = vm.model.get_input_embeddings(input_ids, pixel_values, mask=mask, **extra)
        embeddings = out.inputs_embeds[:, start:]
        position_ids, deltas = out.position_ids, out.rope_deltas
        features = {
            k: v for k, v in out.to_dict().items() if k not in _NOT_FORWARDED and v is not None
        }
    else:
        # Every image is in the cached prefix (or there is none): no encoder run; the
        # positions still come from the whole prompt's image grid.
        embeddings = lm.model.embed_tokens(input_ids[:, start:])
        if vm.mrope:
            position_ids, deltas = lm.get_rope_index(
                input_ids, extra.get("image_grid_thw"), None, mask
            )
        features = {}
    rope_delta = 0
    if vm.mrope:
        if position_ids.ndim == 2:
            position_ids = mx.broadcast_to(position_ids[None], (3, *position_ids.shape))
        position_ids = position_ids[..., start:]
        mx.eval(deltas)
        rope_delta = _ints(deltas.reshape(-1))[0]
    else:
        position_ids = None
    mx.eval(embeddings, *([] if position_ids is None else [position_ids]))
    return VisionPrompt(
        input_ids=tuple(ids),
        cache_key=image_cache_key(ids, vm.image_token_id, digests),
        image_digests=digests,
        image_tokens=len(image_positions),
        start=start,
        embeddings=embeddings,
        position_ids=position_ids,
        rope_delta=rope_delta,
        extra=features,
    )


def image_cache_key(
    ids: Sequence[int], image_token_id: int, digests: Sequence[str]
) -> tuple[int, ...]:
    """Replace each run of image tokens (one run per image, in order) by negative ids that
    depend on the image's content hash: equal keys mean equal pixels at equal places."""
    key: list[int] = []
    image = -1
    within = 0
    previous_was_image = False
    for t in ids:
        if t != image_token_id:
            key.append(t)
            previous_was_image = False
            continue
        if not previous_was_image:
            image += 1
            within = 0
        previous_was_image = True
        # 40 bits of the hash and 20 of the position: keys stay within int64.
        base = int(digests[image][:10], 16) if image < len(digests) else 0
        key.append(-1 - ((base << 20) | (within & 0xFFFFF)))
        within += 1
    return tuple(key)


def count_image_tokens(vm: VisionModel, width: int, height: int) -> int:
    """How many tokens one width x height image becomes (the processor's sizing, no pixels)."""
    from mlx_vlm.utils import estimate_num_image_tokens

    fixed = getattr(vm.processor, "image_seq_length", None)
    if isinstance(fixed, int):
        return fixed  # a fixed-resolution encoder (Gemma 3): every image alike
    try:
        return estimate_num_image_tokens(vm.processor, height, width)
    except ValueError as e:
        raise _unprocessable(e) from None


def count_prompt_tokens(vm: VisionModel, prompt: str, sizes: Sequence[tuple[int, int]]) -> int:
    """Tokens `prepare_vision_prompt` would produce for `prompt` with images of these
    (width, height) sizes, without decoding pixels or running the encoder (count_tokens)."""
    from mlx_vlm.utils import should_add_special_tokens

    check_placeholders(vm, prompt, len(sizes))
    # Expand each image's marker as the processor does, then tokenize the result.
    fixed = getattr(vm.processor, "full_image_sequence", None)
    pieces = prompt.split(vm.image_marker)
    text = pieces[0]
    for (w, h), piece in zip(sizes, pieces[1:], strict=True):
        expanded = (
            fixed if isinstance(fixed, str) else vm.image_marker * count_image_tokens(vm, w, h)
        )
        text += expanded + piece
    ids = vm.tokenizer(
        text, add_special_tokens=should_add_special_tokens(vm.model_type, vm.processor)
    ).input_ids
    return len(ids)


def check_placeholders(vm: VisionModel, prompt: str, images: int) -> None:
    """A 400 unless the prompt holds one image placeholder per image."""
    found = prompt.count(vm.image_marker)
    if found != images:
        raise InvalidRequest(
            f"the prompt has {found} image placeholder(s) for {images} image(s)",
            code="image_count_mismatch",
        )


def forward(
    vm: VisionModel,
    inputs: mx.array,
    cache: list[Any],
    *,
    embeddings: mx.array | None = None,
    position_ids: mx.array | None = None,
    rope_deltas: Sequence[int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> mx.array:
    """One language-model pass over (B, L) `inputs` (or their `embeddings`) extending
    `cache`; returns logits (B, L, vocab). Positions: `position_ids` if given, otherwise each
    row's cache offset + its rope delta (0 for text rows); plain-RoPE models take them from
    the cache themselves."""
    if not vm.mrope:
        out = vm.language_model(inputs, inputs_embeds=embeddings, cache=cache, **(extra or {}))
        return out.logits
    if position_ids is None:
        batch, length = inputs.shape
        offset = cache[0].offset
        offsets = offset if isinstance(offset, mx.array) else mx.array([offset] * batch)
        deltas = mx.array(list(rope_deltas) if rope_deltas is not None else [0] * batch)
        rows = offsets.astype(mx.int32) + deltas.astype(mx.int32)
        positions = rows[:, None] + mx.arange(length, dtype=mx.int32)[None, :]
        position_ids = mx.broadcast_to(positions[None], (3, batch, length))
    out = vm.language_model(
        inputs, inputs_embeds=embeddings, cache=cache, position_ids=position_ids, **(extra or {})
    )
    return out.logits


class LanguageModelView:
    """The language half of a VLM with an mlx-lm model's calling convention
    (`view(inputs, cache=...)` -> logits, `.layers` for `make_prompt_cache`), so code written
    for mlx-lm models (the batch engine, `mlx_lm.generate.generate_step`) runs a VLM's text-only
    rows unchanged. Rows that hold images need their `rope_deltas` (or their prompt's
    `position_ids` during prefill): pass them through the keyword arguments."""

    def __init__(self, vm: VisionModel) -> None:
        self.vm = vm
        self.layers = vm.language_model.layers

    def make_cache(self) -> list[Any]:
        return self.vm.make_cache()

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
        *,
        rope_deltas: Sequence[int] | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        if cache is None:
            cache = self.vm.make_cache()
        return forward(
            self.vm,
            inputs,
            cache,
            embeddings=input_embeddings,
            position_ids=position_ids,
            rope_deltas=rope_deltas,
        )


def prefill(vm: VisionModel, vp: VisionPrompt, cache: list[Any], *, chunk: int = 512) -> mx.array:
    """Read the prompt's tokens `vp.start:` into `cache` (which holds the first `vp.start`)
    in chunks; returns the last position's logits, shape (1, vocab)."""
    ids = mx.array(vp.input_ids[vp.start :])[None]
    total = ids.shape[1]
    done = 0
    while total - done > chunk:
        forward(
            vm,
            ids[:, done : done + chunk],
            cache,
            embeddings=vp.embeddings[:, done : done + chunk],
            position_ids=_cut(vp.position_ids, done, done + chunk),
            extra=vp.extra,
        )
        mx.eval([c.state for c in cache])
        done += chunk
    logits = forward(
        vm,
        ids[:, done:],
        cache,
        embeddings=vp.embeddings[:, done:],
        position_ids=_cut(vp.position_ids, done, total),
        extra=vp.extra,
    )
    return logits[:, -1, :]


def decode_step(
    vm: VisionModel, tokens: Sequence[int], cache: list[Any], rope_deltas: Sequence[int]
) -> mx.array:
    """One decoding step for B rows (a single `KVCache` list or a `BatchKVCache` list):
    returns logits (B, vocab)."""
    inputs = mx.array(list(tokens), dtype=mx.int32)[:, None]
    return forward(vm, inputs, cache, rope_deltas=rope_deltas)[:, -1, :]


def generate_greedy(
    vm: VisionModel,
    vp: VisionPrompt,
    max_tokens: int,
    cache: list[Any] | None = None,
    *,
    chunk: int = 512,
) -> list[int]:
    """Greedy tokens for one prompt (stops after an end-of-sequence token, which is not
    returned): the simplest complete use of this module, and the tests' reference."""
    cache = cache if cache is not None else vm.make_cache()
    logits = prefill(vm, vp, cache, chunk=chunk)
    out: list[int] = []
    while len(out) < max_tokens:
        token = _ints(mx.argmax(logits, axis=-1))[0]
        if token in vm.eos_token_ids:
            break
        out.append(token)
        if len(out) == max_tokens:
            break
        logits = decode_step(vm, [token], cache, [vp.rope_delta])
    return out


def _cut(position_ids: mx.array | None, a: int, b: int) -> mx.array | None:
    return None if position_ids is None else position_ids[..., a:b]


def _unprocessable(e: ValueError) -> ImageError:
    reason = str(e).removeprefix("Failed to process inputs with error: ")
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return ImageError(f"image cannot be processed by this model: {reason}", code="invalid_image")


def _bound_pixels(image_processor: Any, max_pixels: int) -> None:
    current = getattr(image_processor, "max_pixels", None)
    if current is None:
        return  # a fixed-size encoder (Gemma 3): every image is already the same few tokens
    image_processor.max_pixels = min(int(current), max_pixels)
    minimum = getattr(image_processor, "min_pixels", None)
    if minimum is not None and minimum > image_processor.max_pixels:
        image_processor.min_pixels = image_processor.max_pixels


def _ints(a: mx.array) -> list[int]:
    values: Any = a.tolist()
    return [int(v) for v in values]


def _digest(image: Image) -> str:
    from .images import pixel_digest

    return pixel_digest(image.convert("RGB") if image.mode != "RGB" else image)
