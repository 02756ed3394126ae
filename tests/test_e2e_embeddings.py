"""End to end: `POST /v1/embeddings` on the real server (default model, CPU), driven by the
openai SDK and raw httpx, bodies checked against the `openai`
package's response models, used strictly (`mlx_server.testing.openapi`).

The vectors come from the model itself (mean-pooled final hidden states, L2-normalised), so the
tests check their properties: unit length, the same text gives the same vector alone and in a
batch, different texts give different vectors, `dimensions` is truncation then re-normalisation,
base64 carries the same float32 values.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from mlx_server.engine.embeddings import plan_batches
from mlx_server.testing import openapi
from mlx_server.testing.server import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
HIDDEN = 576  # SmolLM2-135M's hidden size
CAT = "The cat sat on the mat"
CAT_IDS = [504, 2644, 2643, 335, 260, 1171]  # CAT in SmolLM2's tokenizer
STOCKS = "Stock markets fell sharply"
STOCKS_IDS = [35380, 6764, 6641, 22463]
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


@pytest.fixture(scope="module")
def server(default_server: ServerProcess) -> ServerProcess:
    return default_server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120.0
    ) as c:
        yield c


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT) as c:
        yield c


def embed(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = http.post("/v1/embeddings", json={"model": MODEL, **fields})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    # The spec types `embedding` as floats only; a base64 body is checked with them decoded.
    view = {
        **body,
        "data": [
            {**d, "embedding": decode_base64(d["embedding"])}
            if isinstance(d["embedding"], str)
            else d
            for d in body["data"]
        ],
    }
    openapi.validate("CreateEmbeddingResponse", view)
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return body


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def decode_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest.fixture(scope="module")
def pair(http: httpx.Client) -> dict[str, Any]:
    """CAT and STOCKS embedded together, as floats (one padded batch of two)."""
    return embed(http, input=[CAT, STOCKS], encoding_format="float")


def test_vectors(pair: dict[str, Any]) -> None:
    cat, stocks = (d["embedding"] for d in pair["data"])
    assert len(cat) == len(stocks) == HIDDEN
    assert all(isinstance(x, float) for x in cat)
    assert abs(norm(cat) - 1.0) < 1e-5 and abs(norm(stocks) - 1.0) < 1e-5
    assert abs(cosine(cat, cat) - 1.0) < 1e-6
    assert max_diff(cat, stocks) > 1e-2  # different texts, different vectors
    assert cosine(cat, stocks) < 0.9999
    tokens = len(CAT_IDS) + len(STOCKS_IDS)
    assert pair["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_same_text_alone_and_in_batch(client: openai.OpenAI, pair: dict[str, Any]) -> None:
    """The same text gives the same vector alone, in a batch, and as token ids (SDK, floats)."""
    alone = client.embeddings.create(model=MODEL, input=CAT, encoding_format="float")
    assert len(alone.data) == 1
    assert alone.usage.prompt_tokens == alone.usage.total_tokens == len(CAT_IDS)
    in_batch = pair["data"][0]["embedding"]
    assert max_diff(alone.data[0].embedding, in_batch) < 1e-5
    # token ids: one list, then a list of lists (order kept, usage counts the ids)
    ids = client.embeddings.create(
        model=MODEL, input=[STOCKS_IDS, CAT_IDS], encoding_format="float"
    )
    assert max_diff(ids.data[0].embedding, pair["data"][1]["embedding"]) < 1e-5
    assert max_diff(ids.data[1].embedding, in_batch) < 1e-5
    assert ids.usage.prompt_tokens == len(CAT_IDS) + len(STOCKS_IDS)


def test_base64_raw_and_sdk(
    http: httpx.Client, client: openai.OpenAI, pair: dict[str, Any]
) -> None:
    body = embed(http, input=[CAT, STOCKS], encoding_format="base64")
    for d, expected in zip(body["data"], pair["data"], strict=True):
        assert isinstance(d["embedding"], str)
        assert len(base64.b64decode(d["embedding"])) == 4 * HIDDEN
        assert max_diff(decode_base64(d["embedding"]), expected["embedding"]) < 1e-6
    # The SDK asks for base64 by default and decodes it itself.
    out = client.embeddings.create(model=MODEL, input=[CAT, STOCKS])
    for d, expected in zip(out.data, pair["data"], strict=True):
        assert len(d.embedding) == HIDDEN
        assert max_diff(d.embedding, expected["embedding"]) < 1e-6
    # Asked for base64 explicitly, the SDK hands the string over as it came.
    explicit = client.embeddings.create(model=MODEL, input=CAT, encoding_format="base64")
    raw = explicit.data[0].embedding
    assert isinstance(raw, str)
    assert max_diff(decode_base64(raw), pair["data"][0]["embedding"]) < 1e-5


def test_dimensions(http: httpx.Client, client: openai.OpenAI, pair: dict[str, Any]) -> None:
    body = embed(http, input=[CAT, STOCKS], dimensions=8)
    full = pair["data"][0]["embedding"][:8]
    scale = norm(full)
    cut = body["data"][0]["embedding"]
    assert len(cut) == 8
    assert abs(norm(cut) - 1.0) < 1e-5
    assert max_diff(cut, [x / scale for x in full]) < 1e-5
    out = client.embeddings.create(model=MODEL, input=CAT, dimensions=HIDDEN)
    assert max_diff(out.data[0].embedding, pair["data"][0]["embedding"]) < 1e-5


# --------------------------------------------------------------------------- errors


def _ok(**extra: Any) -> dict[str, Any]:
    return {"json": {"model": MODEL, "input": "hi", **extra}}


ERROR_CASES = [
    pytest.param({"content": b"{not json"}, 400, None, id="invalid-json"),
    pytest.param({"content": b'["hi"]'}, 400, None, id="json-array-body"),
    pytest.param(
        {"content": b"input=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        400,
        None,
        id="form-content-type",
    ),
    pytest.param({"json": {"model": MODEL}}, 400, "input", id="missing-input"),
    pytest.param(_ok(input=""), 400, "input", id="empty-string"),
    pytest.param(_ok(input=[]), 400, "input", id="empty-list"),
    pytest.param(_ok(input=["a", ""]), 400, "input", id="empty-string-in-list"),
    pytest.param(_ok(input=[[]]), 400, "input", id="empty-ids"),
    pytest.param(_ok(input=5), 400, "input", id="number"),
    pytest.param(_ok(input={"text": "hi"}), 400, "input", id="object"),
    pytest.param(_ok(input=["a", 1]), 400, "input", id="mixed"),
    pytest.param(_ok(input=[[1, "a"]]), 400, "input", id="bad-ids"),
    pytest.param(_ok(input=[1.5]), 400, "input", id="float-id"),
    pytest.param(_ok(input=[-1]), 400, "input", id="negative-id"),
    pytest.param(_ok(input=[[10**9]]), 400, "input", id="id-out-of-vocab"),
    pytest.param(_ok(input=[1] * 9000), 400, "input", id="longer-than-context"),
    pytest.param(_ok(input=["a"] * 2049), 400, "input", id="too-many-inputs"),
    pytest.param(_ok(encoding_format="hex"), 400, "encoding_format", id="format-hex"),
    pytest.param(_ok(encoding_format=1), 400, "encoding_format", id="format-number"),
    pytest.param(_ok(dimensions=0), 400, "dimensions", id="dimensions-0"),
    pytest.param(_ok(dimensions=HIDDEN + 1), 400, "dimensions", id="dimensions-too-large"),
    pytest.param(_ok(dimensions="8"), 400, "dimensions", id="dimensions-string"),
    pytest.param(_ok(user=3), 400, "user", id="user-number"),
    pytest.param(_ok(model="text-embedding-3-small"), 404, "model", id="unknown-model"),
]


@pytest.mark.parametrize(("kwargs", "status", "param"), ERROR_CASES)
def test_errors(http: httpx.Client, kwargs: dict[str, Any], status: int, param: str | None) -> None:
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", None)
    if "content" in kwargs and headers is None:
        headers = {"content-type": "application/json"}
    r = http.post("/v1/embeddings", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    openapi.validate("ErrorResponse", body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if kwargs.get("json", {}).get("input") == [1] * 9000:
        assert error["code"] == "context_length_exceeded"
    if status == 404:
        assert error["code"] == "model_not_found"


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.embeddings.create(model=MODEL, input=CAT, dimensions=HIDDEN + 1)
    assert excinfo.value.param == "dimensions"


# --------------------------------------------------------------------------- batching plan


def test_plan_batches() -> None:
    """Sorted by length; a batch grows while rows x longest stays in budget and padding under
    half of it; an input over the budget is alone; every input is planned exactly once."""
    lengths = [3, 600, 4, 10, 2, 3]
    batches = plan_batches(lengths, max_tokens=16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [1] in batches  # 600 tokens: a batch of its own
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 16
        assert len(b) == 1 or sum(lengths[i] for i in b) >= len(b) * longest / 2
    assert plan_batches([5, 5, 5, 5]) == [[0, 1, 2, 3]]
    assert plan_batches([]) == []
