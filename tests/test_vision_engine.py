"""The vision path (mlx_server/engine/vision.py) against mlx-vlm's own generation, with tiny
random-weight VLMs built from mlx-vlm's classes (mlx_server/testing/tiny_vlm.py): greedy tokens
equal token for token for the same image(s) and prompt; image rows batched with text rows in
one mlx-lm BatchKVCache decode exactly as they do alone; a follow-up turn reuses the KV state of
a prompt that holds the image; token counting agrees with the processor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from PIL import Image

from mlx_server.engine import vision
from mlx_server.engine.images import ImageError, decode_image_bytes
from mlx_server.errors import InvalidRequest, ModelLoadError
from mlx_server.testing.tiny_vlm import TINY_VLM_TYPES, build_tiny_vlm

MAX_TOKENS = 10


def _picture(width: int, height: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (width, height))
    img.putdata(
        [
            ((x * 7 + seed * 50) % 256, (y * 11 + seed * 90) % 256, ((x ^ y) * 5) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return img


RED_SQUARE = _picture(60, 50, 1)  # resized to 56x56: 4 image tokens
WIDE = _picture(130, 70, 2)  # a 2:1 grid: more tokens, unequal height/width positions


@pytest.fixture(scope="module", params=TINY_VLM_TYPES)
def vm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[vision.VisionModel]:
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_tiny_vlm(path, request.param)
    yield vision.load_vision_model(path)


def _prompt(vm: vision.VisionModel, text: str, n_images: int) -> str:
    parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return vision.render_messages(vm, [{"role": "user", "content": parts}])


def _mlx_vlm_greedy(vm: vision.VisionModel, prompt: str, images: list[Image.Image]) -> list[int]:
    from mlx_vlm.generate import stream_generate

    pictures: Any = images or None  # it takes paths, URLs or PIL images
    results = list(
        stream_generate(
            vm.model, vm.processor, prompt, image=pictures, max_tokens=MAX_TOKENS, temperature=0.0
        )
    )
    tokens = list(results[-1].token_ids or [])
    if results[-1].finish_reason == "stop":
        tokens = tokens[:-1]  # it lists the end-of-sequence token; our greedy loop does not
    return tokens


CASES = [
    ("one image", "What is in this picture?", [RED_SQUARE]),
    ("wide image", "Describe it.", [WIDE]),
    ("two images", "Compare them.", [RED_SQUARE, WIDE]),
    ("text only", "Hello there, how are you?", []),
]


@pytest.mark.parametrize(("case", "text", "images"), CASES, ids=[c[0] for c in CASES])
def test_greedy_equals_mlx_vlm(
    vm: vision.VisionModel, case: str, text: str, images: list[Image.Image]
) -> None:
    prompt = _prompt(vm, text, len(images))
    expected = _mlx_vlm_greedy(vm, prompt, images)
    assert len(expected) >= 3, case  # random weights: the comparison must cover real decoding
    vp = vision.prepare_vision_prompt(vm, prompt, images)
    assert vp.image_tokens == sum(vision.count_image_tokens(vm, *im.size) for im in images)
    assert vision.generate_greedy(vm, vp, MAX_TOKENS) == expected
    # mlx-vlm keeps RoPE state on the model between its calls; ours passes positions
    # explicitly, so running it again after another prompt gives the same tokens.
    _mlx_vlm_greedy(vm, _prompt(vm, "Something else entirely.", 1), [WIDE])
    assert vision.generate_greedy(vm, vp, MAX_TOKENS) == expected


def test_chunked_prefill_matches(vm: vision.VisionModel) -> None:
    """Prefill in chunks of 5 tokens (chunk borders inside the image tokens) reads the same."""
    vp = vision.prepare_vision_prompt(vm, _prompt(vm, "Two pictures:", 2), [WIDE, RED_SQUARE])
    assert vp.new_tokens > 15
    whole = vision.generate_greedy(vm, vp, MAX_TOKENS)
    assert vision.generate_greedy(vm, vp, MAX_TOKENS, chunk=5) == whole


def test_the_image_changes_the_answer(vm: vision.VisionModel) -> None:
    """The tiny models are sensitive to pixels, so the equalities above test the images' path."""
    prompt = _prompt(vm, "What is in this picture?", 1)
    answers = [
        vision.generate_greedy(vm, vision.prepare_vision_prompt(vm, prompt, [im]), MAX_TOKENS)
        for im in (RED_SQUARE, WIDE)
    ]
    assert answers[0] != answers[1]


def test_image_rows_batch_with_text_rows(vm: vision.VisionModel) -> None:
    """Three prompts of different lengths (two with images, whose rope deltas differ under
    multimodal RoPE, one text-only) prefilled separately, merged into one left-padded batch
    cache and decoded together: every row's greedy tokens equal its solo run."""
    prompts = [
        vision.prepare_vision_prompt(vm, _prompt(vm, "What is it?", 1), [RED_SQUARE]),
        vision.prepare_vision_prompt(
            vm, _prompt(vm, "A much longer text-only question here.", 0), []
        ),
        vision.prepare_vision_prompt(vm, _prompt(vm, "And these two?", 2), [WIDE, RED_SQUARE]),
    ]
    solo = [vision.generate_greedy(vm, vp, MAX_TOKENS) for vp in prompts]
    if vm.mrope:
        assert len({vp.rope_delta for vp in prompts}) == 3

    caches = []
    tokens = []
    for vp in prompts:
        cache = vm.make_cache()
        tokens.append(_argmax(vision.prefill(vm, vp, cache))[0])
        caches.append(cache)
    batch = [layer[0].merge(list(layer)) for layer in zip(*caches, strict=True)]
    deltas = [vp.rope_delta for vp in prompts]
    outs: list[list[int]] = [[t] for t in tokens]
    for _ in range(MAX_TOKENS - 1):
        logits = vision.decode_step(vm, [o[-1] for o in outs], batch, deltas)
        for row, token in enumerate(_argmax(logits)):
            outs[row].append(token)
    for row, expected in enumerate(solo):
        got = outs[row]
        cut = next((i for i, t in enumerate(got) if t in vm.eos_token_ids), len(got))
        assert got[:cut] == expected, row


def test_follow_up_turn_reuses_the_image_prefix(vm: vision.VisionModel) -> None:
    """Turn 2 repeats turn 1 (same screenshot, sent again in another encoding) and adds text:
    its cache key shares turn 1's prefix, the KV state of that prefix is reused (the encoder
    is skipped since every image token is cached) and the answer equals a cold prefill."""
    png = decode_image_bytes(_encode(WIDE, "PNG"))
    webp = decode_image_bytes(_encode(WIDE, "WEBP", lossless=True))
    assert png.digest == webp.digest
    first = vm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    second = vision.render_messages(
        vm,
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}],
            },
            {"role": "assistant", "content": "A test pattern."},
            {"role": "user", "content": "Which colours?"},
        ],
    )
    turn1 = vision.prepare_vision_prompt(vm, first, [png])
    cache = vm.make_cache()
    vision.prefill(vm, turn1, cache)

    cold = vision.prepare_vision_prompt(vm, second, [webp])
    shared = _common_prefix(turn1.cache_key, cold.cache_key)
    assert shared > max(i for i, t in enumerate(cold.input_ids) if t == vm.image_token_id)
    for c in cache:
        c.trim(c.offset - shared)
    warm = vision.prepare_vision_prompt(vm, second, [webp], start=shared)
    assert warm.input_ids == cold.input_ids and warm.rope_delta == cold.rope_delta
    assert warm.embeddings.shape[1] == len(cold.input_ids) - shared
    assert vision.generate_greedy(vm, warm, MAX_TOKENS, cache=cache) == vision.generate_greedy(
        vm, cold, MAX_TOKENS
    )

    other = vision.prepare_vision_prompt(vm, second, [RED_SQUARE])
    assert _common_prefix(turn1.cache_key, other.cache_key) < shared


def test_follow_up_turn_with_a_new_image(vm: vision.VisionModel) -> None:
    """Turn 2 adds a second image after turn 1's: only the new part is read (the encoder runs,
    its features for the cached image are not used) and the answer equals a cold prefill."""
    first_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A?"}]}
    first = vision.render_messages(vm, [first_turn])
    second = vision.render_messages(
        vm,
        [
            first_turn,
            {"role": "assistant", "content": "B."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And C?"}]},
        ],
    )
    turn1 = vision.prepare_vision_prompt(vm, first, [WIDE])
    cache = vm.make_cache()
    vision.prefill(vm, turn1, cache)
    cold = vision.prepare_vision_prompt(vm, second, [WIDE, RED_SQUARE])
    shared = _common_prefix(turn1.cache_key, cold.cache_key)
    for c in cache:
        c.trim(c.offset - shared)
    warm = vision.prepare_vision_prompt(vm, second, [WIDE, RED_SQUARE], start=shared)
    assert warm.new_tokens < cold.new_tokens - turn1.image_tokens
    expected = vision.generate_greedy(vm, cold, MAX_TOKENS)
    assert vision.generate_greedy(vm, warm, MAX_TOKENS, cache=cache, chunk=3) == expected


def test_text_rows_run_through_mlx_lm_code(vm: vision.VisionModel) -> None:
    """The language-model view runs under mlx-lm's own `generate_step` (and its
    `make_prompt_cache`) for a text-only prompt, matching mlx-vlm's generation."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    prompt = _prompt(vm, "Just text, please.", 0)
    expected = _mlx_vlm_greedy(vm, prompt, [])
    ids = vision.prepare_vision_prompt(vm, prompt, []).input_ids
    view: Any = vision.LanguageModelView(vm)
    got: list[int] = []
    for token, _ in generate_step(
        mx.array(ids),
        view,
        max_tokens=len(expected),
        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
        prompt_cache=make_prompt_cache(view),
    ):
        got.append(int(token))
    assert got == expected


def test_sliding_window_layers_past_their_window(tmp_path: Path) -> None:
    """Gemma 3 with a 12-token window: prompts and answers longer than it rotate the
    sliding-window layers' mlx-lm RotatingKVCache, alone and merged into a batch, and still
    give mlx-vlm's tokens."""
    path = tmp_path / "gemma3-window"
    build_tiny_vlm(path, "gemma3", sliding_window=12)
    vm = vision.load_vision_model(path)
    assert {type(c).__name__ for c in vm.make_cache()} == {"KVCache", "RotatingKVCache"}
    prompts = [
        (_prompt(vm, "Please describe this picture in a few words.", 1), [WIDE]),
        (_prompt(vm, "A text-only question that is longer than the window.", 0), []),
    ]
    prepared = [vision.prepare_vision_prompt(vm, p, ims) for p, ims in prompts]
    solo = [vision.generate_greedy(vm, vp, MAX_TOKENS) for vp in prepared]
    for (prompt, images), got in zip(prompts, solo, strict=True):
        assert got == _mlx_vlm_greedy(vm, prompt, images)
    caches = [vm.make_cache() for _ in prepared]
    outs = [_argmax(vision.prefill(vm, vp, c)) for vp, c in zip(prepared, caches, strict=True)]
    batch = [layer[0].merge(list(layer)) for layer in zip(*caches, strict=True)]
    for _ in range(MAX_TOKENS - 1):
        logits = vision.decode_step(vm, [o[-1] for o in outs], batch, [0, 0])
        for row, token in enumerate(_argmax(logits)):
            outs[row].append(token)
    for got, expected in zip(outs, solo, strict=True):
        cut = next((i for i, t in enumerate(got) if t in vm.eos_token_ids), len(got))
        assert got[:cut] == expected


def test_cache_key_marks_image_tokens_by_content() -> None:
    ids = [1, 9, 9, 2, 9, 9, 9, 3]
    key = vision.image_cache_key(ids, 9, ["ab" * 32, "cd" * 32])
    assert [k for k in key if k >= 0] == [1, 2, 3]
    negatives = [k for k in key if k < 0]
    assert len(negatives) == 5 and len(set(negatives)) == 5
    assert vision.image_cache_key(ids, 9, ["ab" * 32, "ef" * 32])[:4] == key[:4]
    assert vision.image_cache_key(ids, 9, ["ab" * 32, "ef" * 32])[4:] != key[4:]


@pytest.mark.parametrize("sizes", [[], [(60, 50)], [(130, 70), (20, 300)], [(400, 400)]])
def test_count_prompt_tokens_agrees_with_the_processor(
    vm: vision.VisionModel, sizes: list[tuple[int, int]]
) -> None:
    prompt = _prompt(vm, "Count me.", len(sizes))
    images = [_picture(w, h, i) for i, (w, h) in enumerate(sizes)]
    vp = vision.prepare_vision_prompt(vm, prompt, images)
    assert vision.count_prompt_tokens(vm, prompt, sizes) == len(vp.input_ids)


def test_max_image_pixels_bounds_image_tokens(tmp_path: Path) -> None:
    """A server-side pixel bound scales big images down before the encoder: fewer tokens,
    counted consistently, and still mlx-vlm's own output for the bounded processor."""
    path = tmp_path / "vlm"
    build_tiny_vlm(path, "qwen2_5_vl")
    full = vision.load_vision_model(path)
    small = vision.load_vision_model(path, max_image_pixels=56 * 56)
    big = _picture(400, 400, 3)
    assert vision.count_image_tokens(full, 400, 400) == 16
    assert vision.count_image_tokens(small, 400, 400) == 4
    prompt = _prompt(small, "Big picture.", 1)
    vp = vision.prepare_vision_prompt(small, prompt, [big])
    assert vp.image_tokens == 4
    assert vision.count_prompt_tokens(small, prompt, [(400, 400)]) == len(vp.input_ids)
    assert vision.generate_greedy(small, vp, MAX_TOKENS) == _mlx_vlm_greedy(small, prompt, [big])
    gemma = tmp_path / "gemma3"
    build_tiny_vlm(gemma, "gemma3")
    fixed = vision.load_vision_model(gemma, max_image_pixels=56 * 56)
    assert vision.count_image_tokens(fixed, 4000, 3000) == 4


def test_placeholder_count_must_match_images(vm: vision.VisionModel) -> None:
    with pytest.raises(InvalidRequest) as info:
        vision.prepare_vision_prompt(vm, _prompt(vm, "Two?", 2), [RED_SQUARE])
    assert info.value.code == "image_count_mismatch"
    with pytest.raises(InvalidRequest):
        vision.count_prompt_tokens(vm, _prompt(vm, "None.", 0), [(10, 10)])


@pytest.mark.parametrize("size", [(1, 5000), (700, 3)])
def test_images_the_processor_refuses_are_400s(
    vm: vision.VisionModel, size: tuple[int, int]
) -> None:
    """Qwen's processor refuses aspect ratios over 200:1 (a 400); Gemma 3's fixed-size
    encoder squeezes any image to its square."""
    if not vm.mrope:
        vp = vision.prepare_vision_prompt(vm, _prompt(vm, "Thin.", 1), [Image.new("RGB", size)])
        assert vp.image_tokens == vision.count_image_tokens(vm, *size) == 4
        return
    with pytest.raises(ImageError) as info:
        vision.prepare_vision_prompt(vm, _prompt(vm, "Thin.", 1), [Image.new("RGB", size)])
    assert info.value.status == 400 and "aspect ratio" in info.value.message
    with pytest.raises(ImageError):
        vision.count_image_tokens(vm, *size)


def test_checkpoint_detection(tmp_path: Path) -> None:
    vlm_dir = tmp_path / "vlm"
    _, config = build_tiny_vlm(vlm_dir, "qwen2_5_vl")
    assert vision.is_vision_config(config) and vision.is_vision_checkpoint(vlm_dir)
    text_dir = tmp_path / "text"  # a text model's config: no vision_config
    text_dir.mkdir()
    (text_dir / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    assert not vision.is_vision_checkpoint(text_dir)
    assert not vision.is_vision_config({"model_type": "qwen2_5_vl"})
    assert not vision.is_vision_config({"model_type": "../x", "vision_config": {}})
    assert not vision.is_vision_config({"model_type": "no_such_vlm", "vision_config": {}})
    with pytest.raises(ModelLoadError, match="not a vision-language checkpoint"):
        vision.load_vision_model(text_dir)
    # A family mlx-vlm knows but this module does not run yet: a clear refusal.
    (vlm_dir / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    assert vision.is_vision_checkpoint(vlm_dir)
    with pytest.raises(ModelLoadError, match="not supported yet"):
        vision.load_vision_model(vlm_dir)


def _argmax(logits: mx.array) -> list[int]:
    values: Any = mx.argmax(logits, axis=-1).tolist()
    return [int(v) for v in values]


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
