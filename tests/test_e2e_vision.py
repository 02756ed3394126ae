"""Vision input end to end: one real server process serving tiny random-weight VLMs built from
mlx-vlm's own classes (Qwen2.5-VL and Qwen3-VL with multimodal RoPE, Gemma 3 with sliding-window
layers) beside a tiny text model.

- Greedy answers about an image equal mlx-vlm's own generation for the same image and prompt,
  through chat completions (`image_url`), Anthropic messages (`image` blocks) and Responses
  (`input_image`); alone, and while text requests run concurrently on the same VLM (text rows
  in its batch) and on the text model.
- A follow-up turn about the same image (sent again, re-encoded) reads the earlier prompt,
  image tokens included, from the prefix cache, and still answers as mlx-vlm does.
- count_tokens (Anthropic) and input_tokens (Responses) count the image's tokens, equal to the
  usage of the same request.
- Bad images are 400s in each dialect's error shape: unreadable, oversized bytes, too many
  pixels, a decompression bomb, an unsupported format, an image to a text-only model, a URL
  while fetching is off. With `--allow-image-urls on`, a URL on 127.0.0.1 is fetched (and an
  oversized or missing one is a 400).
- Nothing is left running afterwards.
"""

from __future__ import annotations

import base64
import http.server as http_server
import io
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from PIL import Image

from mlx_server.engine import vision
from mlx_server.engine.detokenizer import StreamingDetokenizer
from mlx_server.engine.tokenizer import Tokenizer, load_hf_tokenizer
from mlx_server.testing import openapi
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model
from mlx_server.testing.tiny_vlm import build_tiny_vlm

MAX_TOKENS = 8
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3")
QUESTION = "What is in this picture?"
FOLLOW_UP = "And which colours?"
TOKENIZERS: dict[str, Tokenizer] = {}


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


PICTURE = _picture(60, 50, 1)


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


PNG = _encode(PICTURE, "PNG")
PNG_URL = _data_url(PNG)
WEBP_URL = _data_url(_encode(PICTURE, "WEBP", lossless=True), "image/webp")


def _env() -> dict[str, str]:
    """The server computes with MLX's own BLAS, as the references here do: random tiny VLMs
    are chaotic enough that another BLAS's last-bit differences change a greedy token."""
    env = {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}
    return {**env, "MLX_SERVER_BLAS": "off"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision-models")
    out: dict[str, Path] = {}
    for family in FAMILIES:
        out[family] = root / family
        build_tiny_vlm(out[family], family)
    out["text"] = root / "text"
    build_tiny_model(out["text"], "llama")
    return out


def _mlx_vlm(vm: vision.VisionModel, messages: list[dict[str, Any]], images: list[Any]) -> str:
    """mlx-vlm's own greedy answer, as the server's streaming detokenizer shows those tokens
    (random weights pick bytes that are not UTF-8: their replacement characters depend on how
    the text is cut, so the text is made the way the server makes it)."""
    from mlx_vlm.generate import stream_generate

    prompt = vision.render_messages(vm, messages)
    pictures: Any = images or None
    results = list(
        stream_generate(
            vm.model, vm.processor, prompt, image=pictures, max_tokens=MAX_TOKENS, temperature=0.0
        )
    )
    ids = [int(t) for t in results[-1].token_ids or []]
    if results[-1].finish_reason == "stop":
        ids = ids[:-1]
    detok = StreamingDetokenizer(TOKENIZERS[vm.model_type])
    return "".join(detok.add(t) for t in ids) + detok.flush()


def _turn1() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _turn2(answer: str) -> list[dict[str, Any]]:
    return [
        *_turn1(),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOW_UP},
    ]


@pytest.fixture(scope="module")
def refs(dirs: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Per family: mlx-vlm's answer to the image question, to the follow-up turn, and to a
    text-only question."""
    out: dict[str, dict[str, str]] = {}
    for family in FAMILIES:
        vm = vision.load_vision_model(dirs[family])
        config = json.loads((dirs[family] / "config.json").read_text())
        TOKENIZERS[family] = load_hf_tokenizer(dirs[family], config)
        first = _mlx_vlm(vm, _turn1(), [PICTURE])
        out[family] = {
            "image": first,
            "follow_up": _mlx_vlm(vm, _turn2(first), [PICTURE]),
            "text": _mlx_vlm(vm, [{"role": "user", "content": "Say something."}], []),
        }
        assert len(first) >= 3, family  # the comparison covers real decoding
    return out


@pytest.fixture(scope="module")
def server(
    dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("vision-server") / "server.log"
    args = [a for f in FAMILIES for a in ("--model", f"{f}={dirs[f]}")]
    args += ["--model", f"text={dirs['text']}"]
    args += ["--max-image-bytes", "100000", "--max-image-pixels", "1000000"]
    args += ["--prefill-chunk", "16"]  # image prompts read in several chunks
    with run_server(args, env=_env(), log_path=log) as srv:
        _wait_loaded(srv)
        yield srv


def _wait_loaded(srv: ServerProcess) -> None:
    """The default model answers /health first; the others load after it."""
    deadline = time.monotonic() + 120
    models: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        models = httpx.get(f"{srv.base_url}/v1/models", timeout=10).json()["data"]
        if all(m["metadata"]["state"] == "loaded" for m in models):
            return
        time.sleep(0.1)
    raise AssertionError(f"models not loaded: {models}")


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


# ------------------------------------------------------------------------- request shapes


def _chat_body(model: str, url: str = PNG_URL, **extra: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def _anthropic_image(url: str = PNG_URL) -> dict[str, Any]:
    if url.startswith("data:"):
        head, data = url.split(",", 1)
        media = head[5:].split(";")[0]
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _messages_body(model: str, url: str = PNG_URL) -> dict[str, Any]:
    content = [_anthropic_image(url), {"type": "text", "text": QUESTION}]
    return {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }


def _responses_body(model: str, url: str = PNG_URL) -> dict[str, Any]:
    content = [
        {"type": "input_image", "image_url": url},
        {"type": "input_text", "text": QUESTION},
    ]
    return {
        "model": model,
        "max_output_tokens": MAX_TOKENS,
        "temperature": 0,
        "input": [{"role": "user", "content": content}],
    }


def _chat_text(body: dict[str, Any]) -> str:
    return body["choices"][0]["message"]["content"]


def _messages_text(body: dict[str, Any]) -> str:
    return "".join(b["text"] for b in body["content"] if b["type"] == "text")


def _responses_text(body: dict[str, Any]) -> str:
    return "".join(
        c["text"]
        for item in body["output"]
        if item["type"] == "message"
        for c in item["content"]
        if c["type"] == "output_text"
    )


# ------------------------------------------------------------------------------ the tests


def test_models_report_the_vision_capability(http: httpx.Client) -> None:
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    for family in FAMILIES:
        assert "vision" in models[family]["metadata"]["capabilities"], family
    assert "vision" not in models["text"]["metadata"]["capabilities"]
    for name, vision_model in (("qwen2_5_vl", True), ("text", False)):
        shown = http.post("/api/show", json={"model": name}).json()
        assert ("vision" in shown["capabilities"]) is vision_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_api_answers_as_mlx_vlm(
    http: httpx.Client, refs: dict[str, dict[str, str]], family: str
) -> None:
    expected = refs[family]["image"]
    r = http.post("/v1/chat/completions", json=_chat_body(family))
    assert r.status_code == 200, r.text
    assert _chat_text(r.json()) == expected
    r = http.post("/v1/messages", json=_messages_body(family))
    assert r.status_code == 200, r.text
    assert _messages_text(r.json()) == expected
    r = http.post("/v1/responses", json=_responses_body(family))
    assert r.status_code == 200, r.text
    assert _responses_text(r.json()) == expected
    # A text-only request to the same model reads as mlx-vlm's text-only generation.
    text = {
        "model": family,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    r = http.post("/v1/chat/completions", json=text)
    assert r.status_code == 200, r.text
    assert _chat_text(r.json()) == refs[family]["text"]


def test_ollama_images(http: httpx.Client, refs: dict[str, dict[str, str]]) -> None:
    """Ollama's `images` (bare base64) on /api/chat and /api/generate read the same."""
    image = base64.b64encode(PNG).decode()
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    for family in ("qwen2_5_vl", "gemma3"):
        message = {"role": "user", "content": QUESTION, "images": [image]}
        body = {"model": family, "messages": [message], "stream": False, "options": options}
        r = http.post("/api/chat", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["message"]["content"] == refs[family]["image"]
        body = {
            "model": family,
            "prompt": QUESTION,
            "images": [image],
            "stream": False,
            "options": options,
        }
        r = http.post("/api/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["response"] == refs[family]["image"]
    body = {"model": "text", "messages": [message], "stream": False, "options": options}
    r = http.post("/api/chat", json=body)
    assert r.status_code == 400, r.text
    assert "does not accept images" in r.json()["error"]


async def test_image_rows_batch_with_text_rows(
    server: ServerProcess, refs: dict[str, dict[str, str]]
) -> None:
    """Every family's image question through the three APIs at once, with text requests on the
    same VLMs and on the text model running beside them: every answer as when alone."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        solo_text = {}
        for model in (*FAMILIES, "text"):
            r = await client.post("/v1/chat/completions", json=_text_body(model))
            assert r.status_code == 200, r.text
            solo_text[model] = _chat_text(r.json())
        got: dict[tuple[str, str], str] = {}

        async def one(key: tuple[str, str], path: str, body: dict[str, Any], read: Any) -> None:
            r = await client.post(path, json=body)
            assert r.status_code == 200, r.text
            got[key] = read(r.json())

        async with trio.open_nursery() as nursery:
            for family in FAMILIES:
                nursery.start_soon(
                    one, (family, "chat"), "/v1/chat/completions", _chat_body(family), _chat_text
                )
                nursery.start_soon(
                    one,
                    (family, "messages"),
                    "/v1/messages",
                    _messages_body(family),
                    _messages_text,
                )
                nursery.start_soon(
                    one, (family, "responses"), "/v1/responses", _responses_body(family),
                    _responses_text,
                )  # fmt: skip
            for model in (*FAMILIES, "text", "text"):
                for i in range(2):
                    nursery.start_soon(
                        one, (model, f"text{i}"), "/v1/chat/completions", _text_body(model),
                        _chat_text,
                    )  # fmt: skip
    for (model, kind), answer in got.items():
        if kind.startswith("text"):
            assert answer == solo_text[model], (model, kind)
        else:
            assert answer == refs[model]["image"], (model, kind)


def _text_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_follow_up_turn_reuses_the_image_prefix(
    http: httpx.Client, refs: dict[str, dict[str, str]], family: str
) -> None:
    """Turn 2 sends the same picture again (now as lossless WebP: same pixels, same hash): the
    prompt up to the end of turn 1, image tokens included, comes from the prefix cache."""
    first = http.post("/v1/chat/completions", json=_chat_body(family))
    assert first.status_code == 200, first.text
    answer = _chat_text(first.json())
    body = _chat_body(family, WEBP_URL)
    body["messages"] += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOW_UP},
    ]
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    turn1_tokens = first.json()["usage"]["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= turn1_tokens - 1, usage
    assert _chat_text(r.json()) == refs[family]["follow_up"]

    # Anthropic reports the same as cache_read_input_tokens.
    messages = _messages_body(family, WEBP_URL)
    messages["messages"] += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOW_UP},
    ]
    r = http.post("/v1/messages", json=messages)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["cache_read_input_tokens"] >= turn1_tokens - 1
    assert _messages_text(r.json()) == refs[family]["follow_up"]


def test_responses_follow_up_by_previous_response_id(http: httpx.Client) -> None:
    """A stored response's image is part of the next turn's conversation: read from the
    prefix cache, its tokens counted."""
    first = http.post("/v1/responses", json=_responses_body("qwen2_5_vl"))
    assert first.status_code == 200, first.text
    body = {
        "model": "qwen2_5_vl",
        "max_output_tokens": MAX_TOKENS,
        "temperature": 0,
        "previous_response_id": first.json()["id"],
        "input": FOLLOW_UP,
    }
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["input_tokens"] > first.json()["usage"]["input_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] >= first.json()["usage"]["input_tokens"]


def test_tool_results_carry_screenshots(http: httpx.Client) -> None:
    """A tool's image result (a coding agent reading a screenshot file): Anthropic's
    tool_result image block and OpenAI's tool message image part give the same prompt and the
    same answer; its tokens are counted."""
    family = "qwen2_5_vl"
    call = {"type": "tool_use", "id": "t1", "name": "Read", "input": {"path": "shot.png"}}
    result = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [_anthropic_image(), {"type": "text", "text": "shot.png"}],
    }
    anthropic_body = {
        "model": family,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "messages": [
            {"role": "user", "content": "Read shot.png"},
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
        ],
    }
    r = http.post("/v1/messages", json=anthropic_body)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    with_image = usage["input_tokens"] + usage["cache_read_input_tokens"]
    openai_call = {
        "id": "t1",
        "type": "function",
        "function": {"name": "Read", "arguments": '{"path": "shot.png"}'},
    }
    tool_content = [
        {"type": "image_url", "image_url": {"url": PNG_URL}},
        {"type": "text", "text": "shot.png"},
    ]
    openai_body = {
        "model": family,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "messages": [
            {"role": "user", "content": "Read shot.png"},
            {"role": "assistant", "content": None, "tool_calls": [openai_call]},
            {"role": "tool", "tool_call_id": "t1", "content": tool_content},
        ],
    }
    o = http.post("/v1/chat/completions", json=openai_body)
    assert o.status_code == 200, o.text
    assert o.json()["usage"]["prompt_tokens"] == with_image
    assert _chat_text(o.json()) == _messages_text(r.json())
    result["content"] = [{"type": "text", "text": "shot.png"}]
    counted = http.post(
        "/v1/messages/count_tokens",
        json={k: anthropic_body[k] for k in ("model", "messages")},
    )
    assert counted.json()["input_tokens"] < with_image - 3  # the image's tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_token_counts_include_the_image(http: httpx.Client, family: str) -> None:
    body = _messages_body(family)
    r = http.post("/v1/messages/count_tokens", json={k: body[k] for k in ("model", "messages")})
    assert r.status_code == 200, r.text
    count = r.json()["input_tokens"]
    text_only = {"model": family, "messages": [{"role": "user", "content": QUESTION}]}
    r = http.post("/v1/messages/count_tokens", json=text_only)
    assert r.json()["input_tokens"] < count - 3  # the image's tokens counted
    r = http.post("/v1/chat/completions", json=_chat_body(family, max_tokens=1))
    assert r.json()["usage"]["prompt_tokens"] == count
    rb = _responses_body(family)
    r = http.post("/v1/responses/input_tokens", json={k: rb[k] for k in ("model", "input")})
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] == count


# ------------------------------------------------------------------------- bad images


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one tiny compressed row: a bomb's
    shape (a few dozen bytes claiming gigapixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _noise_png(width: int, height: int) -> bytes:
    img = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    return _encode(img, "PNG")


Q = "qwen2_5_vl"
BAD_IMAGES = [
    pytest.param(Q, "data:image/png;base64,not base64!!", "invalid_image_data", id="not-base64"),
    pytest.param(Q, _data_url(PNG[:60]), "invalid_image", id="truncated"),
    pytest.param(Q, _data_url(_noise_png(200, 200)), "image_too_large", id="oversized-bytes"),
    pytest.param(
        Q,
        _data_url(_encode(Image.new("RGB", (1500, 1000)), "PNG")),
        "image_too_large",
        id="too-many-pixels",
    ),
    pytest.param(
        Q,
        _data_url(_png_header_only(100_000, 100_000)),
        "image_too_large",
        id="decompression-bomb",
    ),
    pytest.param(
        Q, _data_url(_encode(PICTURE, "BMP"), "image/bmp"), "unsupported_image_format", id="bmp"
    ),
    pytest.param(
        Q, "data:text/plain;base64,aGVsbG8=", "unsupported_image_format", id="not-an-image"
    ),
    pytest.param(  # Qwen's processor refuses an aspect ratio over 200:1
        Q, _data_url(_encode(Image.new("RGB", (900, 4)), "PNG")), "invalid_image", id="sliver"
    ),
    pytest.param("text", PNG_URL, "model_not_vision", id="text-only-model"),
    pytest.param(Q, "http://127.0.0.1:9/a.png", "image_fetch_disabled", id="url-without-flag"),
]


@pytest.mark.parametrize(("model", "url", "code"), BAD_IMAGES)
def test_bad_images_are_400s_in_each_dialect(
    http: httpx.Client, model: str, url: str, code: str
) -> None:
    r = http.post("/v1/chat/completions", json=_chat_body(model, url))
    assert r.status_code == 400, r.text
    openapi.validate("ErrorResponse", r.json())
    error = r.json()["error"]
    assert error["code"] == code, error
    assert error["param"] == "messages[0].content[0]", error
    assert error["type"] == "invalid_request_error"

    if url.startswith("data:") and ";base64," not in url:
        return
    r = http.post("/v1/messages", json=_messages_body(model, url))
    assert r.status_code == 400, r.text
    body = r.json()
    openapi.validate("ErrorEvent", body)
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == error["message"]

    r = http.post("/v1/responses", json=_responses_body(model, url))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"] == error["message"]


def test_streams_and_abandoned_streams(http: httpx.Client, refs: dict[str, dict[str, str]]) -> None:
    """An image request streamed reads as mlx-vlm; one abandoned after its first chunk (the
    client goes away) leaves the batch."""
    for family in FAMILIES:
        text = ""
        with http.stream("POST", "/v1/chat/completions", json=_chat_body(family, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        assert text == refs[family]["image"]
        body = _chat_body(family, stream=True, max_tokens=200, ignore_eos=True)
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())


def test_embeddings_from_a_vlm_are_refused(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": "qwen2_5_vl", "input": "hello"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model"


def test_nothing_is_left_running(http: httpx.Client) -> None:
    deadline = time.monotonic() + 30  # abandoned streams end at their next step
    while True:
        health = http.get("/health").json()
        if health["running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert health["status"] == "ok"
    assert health["running"] == 0 and health["waiting"] == 0


# ------------------------------------------------------------------------ image URLs


class _Images(http_server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        bodies = {"/picture.png": PNG, "/big.png": _noise_png(200, 200)}
        data = bodies.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    httpd = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_image_urls_are_fetched_when_allowed(
    dirs: dict[str, Path],
    refs: dict[str, dict[str, str]],
    image_host: str,
    tmp_path: Path,
) -> None:
    args = ["--model", f"qwen2_5_vl={dirs['qwen2_5_vl']}", "--allow-image-urls", "on"]
    args += ["--max-image-bytes", "100000"]
    with (
        run_server(args, env=_env(), log_path=tmp_path / "server.log") as srv,
        httpx.Client(base_url=srv.base_url, timeout=120) as client,
    ):
        url = f"{image_host}/picture.png"
        r = client.post("/v1/chat/completions", json=_chat_body("qwen2_5_vl", url))
        assert r.status_code == 200, r.text
        assert _chat_text(r.json()) == refs["qwen2_5_vl"]["image"]
        r = client.post("/v1/messages", json=_messages_body("qwen2_5_vl", url))
        assert r.status_code == 200, r.text
        assert _messages_text(r.json()) == refs["qwen2_5_vl"]["image"]
        for path, code in (("/big.png", "image_too_large"), ("/gone.png", "image_fetch_failed")):
            body = _chat_body("qwen2_5_vl", image_host + path)
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == code
        assert client.get("/health").json()["running"] == 0
