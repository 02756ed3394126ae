"""`/v1/models` tells a client what it can plan with: the bundled default model's context
length, capabilities, quantization and tool prompt, in the strict model-list contract."""

from __future__ import annotations

import httpx

from mlx_server.testing import openapi
from mlx_server.testing.server import ServerProcess


def test_default_model_card(default_server: ServerProcess) -> None:
    r = httpx.get(default_server.base_url + "/v1/models", timeout=30)
    assert r.status_code == 200
    body = r.json()
    openapi.validate("openai.ModelList", body)
    (card,) = body["data"]
    meta = card["metadata"]
    assert meta["state"] == "loaded"
    assert meta["context_length"] == 8192
    assert meta["capabilities"] == ["completion", "tools"]  # tools through the generic prompt
    assert meta["tool_prompt"] == "generic"
    assert meta["quantization"] == "Q4_1"
    assert meta["model_type"] == "llama"
    assert meta["disk_bytes"] > 50_000_000
