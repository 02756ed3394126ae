"""OpenAI embeddings: `POST /v1/embeddings`, computed by the loaded model.

Each input's vector is the mean of the model's final hidden states (after the final norm) over
the input's tokens, L2-normalised; `dimensions` truncates it and normalises again. See
`engine.embeddings` for the pooling and `Frontend.embed` for how the work reaches the executor
thread. Texts are tokenized without a chat template (with a BOS token only for models that want
one); token-id inputs are used as they are.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from quart import Blueprint, Response

from ..errors import InvalidRequest
from ..messages import PromptSpec
from . import outcome
from .params import Fields, json_body, prompt_inputs
from .state import models, use_model

bp = Blueprint("embeddings", __name__)

MAX_INPUTS = 2048  # OpenAI's limit
ENCODING_FORMATS = ("float", "base64")


def parse_inputs(raw: Any, *, param: str = "input") -> list[PromptSpec]:
    """A non-empty string, a list of them, a list of token ids, or a list of lists of ids."""
    return prompt_inputs(raw, param=param, allow_empty_text=False, max_items=MAX_INPUTS)


def encode_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64: what OpenAI sends and its SDKs decode."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@bp.post("/v1/embeddings")
async def embeddings() -> Response | dict[str, Any]:
    models()  # 503 until the server is ready
    body = await json_body()
    f = Fields(body)
    fe = await use_model(body.get("model"))
    specs = parse_inputs(body.get("input"))
    encoding = f.string("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise InvalidRequest(
            f"'encoding_format' must be one of {list(ENCODING_FORMATS)}, got {encoding!r}",
            param="encoding_format",
        )
    dimensions = f.integer("dimensions", None, lo=1)
    f.string("user")

    vocab = fe.vocab_size
    inputs: list[tuple[int, ...]] = []
    for i, spec in enumerate(specs):
        if spec.token_ids is not None:
            bad = [t for t in spec.token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(
                    f"'input[{i}]': token id {bad[0]} is out of range [0, {vocab})", param="input"
                )
        ids = await fe.prompt_ids(spec)
        fe.check_length(ids, param="input", what=f"'input[{i}]'")
        inputs.append(ids)

    vectors = await fe.embed(inputs, dimensions=dimensions)
    total = sum(len(ids) for ids in inputs)
    outcome.current().prompt_tokens = total
    return {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode_base64(v) if encoding == "base64" else v,
            }
            for i, v in enumerate(vectors)
        ],
        "model": fe.model_name,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
