"""The batch engine over a VLM (mlx_server/engine/vision_rows.py), in process, with tiny
random-weight VLMs: image rows and text rows decode in one batch, each row's greedy tokens as
mlx-vlm gives them alone; an image prompt is read in prefill chunks while another row keeps
decoding; a follow-up turn served from a stored state (image tokens keyed by content) answers
as a cold read; the prompt keys the frontend computes are the ones the executor reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from mlx_server.engine import vision
from mlx_server.engine.images import DecodedImage, decode_image_bytes
from mlx_server.engine.vision_rows import PromptKeys, VisionBatchEngine
from mlx_server.messages import (
    Admit,
    CachedPrefix,
    GenerationRequest,
    PrefillProgress,
    SamplingParams,
    SequenceFinished,
    TokenOut,
    VisionInput,
)
from mlx_server.testing.tiny_vlm import build_tiny_vlm

MAX_TOKENS = 10
PROMPTS: dict[str, tuple[str, list[DecodedImage]]] = {}


def _image(width: int, height: int, seed: int) -> DecodedImage:
    import io

    img = Image.new("RGB", (width, height))
    img.putdata(
        [
            ((x * 7 + seed * 50) % 256, (y * 11 + seed * 90) % 256, ((x ^ y) * 5) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return decode_image_bytes(buf.getvalue())


SQUARE = _image(60, 50, 1)
WIDE = _image(130, 70, 2)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "gemma3"])
def vm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[vision.VisionModel]:
    path = tmp_path_factory.mktemp(f"rows-{request.param}")
    build_tiny_vlm(path, request.param)
    yield vision.load_vision_model(path)


def _messages(text: str, n_images: int) -> list[dict[str, Any]]:
    parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _request(
    vm: vision.VisionModel, rid: str, messages: list[dict[str, Any]], images: list[DecodedImage]
) -> GenerationRequest:
    prompt = vision.render_messages(vm, messages)
    ids = PromptKeys(vm).key(prompt, images)
    PROMPTS[rid] = (prompt, images)
    return GenerationRequest(
        request_id=rid,
        prompt_ids=ids,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=MAX_TOKENS,
        vision=VisionInput(text=prompt, images=tuple(images)) if images else None,
    )


def _solo(vm: vision.VisionModel, request: GenerationRequest) -> list[int]:
    """engine.vision's own greedy loop (checked against mlx-vlm in test_vision_engine)."""
    text, images = PROMPTS[request.request_id]
    vp = vision.prepare_vision_prompt(vm, text, images)
    assert vp.cache_key == request.prompt_ids  # the frontend's keys are the executor's
    return vision.generate_greedy(vm, vp, MAX_TOKENS)


def _engine(vm: vision.VisionModel, chunk: int = 512) -> VisionBatchEngine:
    vocab = vm.language_model.model.embed_tokens.weight.shape[0]
    return VisionBatchEngine(
        vm, eos_token_ids=vm.eos_token_ids, vocab_size=vocab, prefill_chunk=chunk
    )


def _run(engine: VisionBatchEngine, later: dict[int, Admit] | None = None) -> dict[str, Any]:
    """Step to the end; `later` admits requests before the given step. Returns each row's
    tokens, the widest batch, and for each step the rows that read prompt / got a token."""
    tokens: dict[str, list[int]] = {}
    steps: list[tuple[set[str], set[str]]] = []
    finished: dict[str, SequenceFinished] = {}
    widest = 0
    step = 0
    while engine.has_work or (later and any(k >= step for k in later)):
        if later and step in later:
            engine.admit(later[step])
        reading: set[str] = set()
        decoding: set[str] = set()
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
                decoding.add(ev.request_id)
            elif isinstance(ev, PrefillProgress):
                reading.add(ev.request_id)
            elif isinstance(ev, SequenceFinished):
                finished[ev.request_id] = ev
        widest = max(widest, len(engine.running))
        steps.append((reading, decoding))
        step += 1
    return {"tokens": tokens, "widest": widest, "steps": steps, "finished": finished}


def test_image_and_text_rows_decode_together(vm: vision.VisionModel) -> None:
    requests = [
        _request(vm, "img1", _messages("What is it?", 1), [SQUARE]),
        _request(vm, "text", _messages("A longer text-only question, please.", 0), []),
        _request(vm, "img2", _messages("And these two?", 2), [WIDE, SQUARE]),
    ]
    engine = _engine(vm)
    for r in requests:
        engine.admit(Admit(request=r))
    out = _run(engine)
    assert out["widest"] == 3
    for r in requests:
        expected = _solo(vm, r)
        assert out["tokens"].get(r.request_id, []) == expected, r.request_id


def test_an_image_prompt_is_read_in_chunks_beside_a_decoding_row(vm: vision.VisionModel) -> None:
    text = _request(vm, "text", _messages("Tell me a story.", 0), [])
    text = GenerationRequest(**{**_fields(text), "max_tokens": 40, "ignore_eos": True})
    image = _request(vm, "img", _messages("Describe both pictures in detail.", 2), [WIDE, SQUARE])
    engine = _engine(vm, chunk=8)
    engine.admit(Admit(request=text))
    out = _run(engine, later={6: Admit(request=image)})
    both = [s for s in out["steps"] if "img" in s[0] and "text" in s[1]]
    assert len(both) >= 3  # several chunks of the image prompt, the text row decoding beside
    assert out["tokens"]["img"] == _solo(vm, image)
    assert len(out["tokens"]["text"]) == 40


def test_follow_up_turn_from_the_stored_state(vm: vision.VisionModel) -> None:
    first = _request(vm, "t1", _messages("What is it?", 1), [WIDE])
    engine = _engine(vm)
    engine.admit(Admit(request=first))
    out = _run(engine)
    stored = out["finished"]["t1"].stored
    assert stored is not None
    answer = vm.tokenizer.decode(out["tokens"]["t1"], skip_special_tokens=True)
    messages = [
        *_messages("What is it?", 1),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Which colours?"},
    ]
    second = _request(vm, "t2", messages, [WIDE])
    shared = 0
    for a, b in zip(stored.token_ids, second.prompt_ids, strict=False):
        if a != b:
            break
        shared += 1
    image_end = max(i for i, t in enumerate(second.prompt_ids) if t < 0)
    assert shared > image_end  # the image's tokens are in the shared prefix
    engine.admit(Admit(request=second, prefix=CachedPrefix(handle=stored.handle, length=shared)))
    again = _run(engine)
    assert again["finished"]["t2"].cached_tokens == shared
    assert again["tokens"].get("t2", []) == _solo(vm, second)


def _fields(request: GenerationRequest) -> dict[str, Any]:
    import attrs

    return attrs.asdict(request, recurse=False)
