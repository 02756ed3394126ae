"""Sampling defaults through the real server: a request's own fields win, then the server's
flags (`--temperature` ...), then the model's generation_config.json, then the API default."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

pytestmark = pytest.mark.slow


def _model(root: Path, generation_config: dict[str, object] | None) -> Path:
    path = root / "tiny"
    build_tiny_model(path, "llama")
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


def _serve(root: Path, model: Path, *flags: str) -> Iterator[ServerProcess]:
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    with run_server(
        ["--model", str(model), "--prompt-cache-bytes", "0", *flags],
        env=env,
        log_path=root / "server.log",
    ) as server:
        yield server


def _texts(server: ServerProcess, seeds: range, **fields: object) -> list[str]:
    out = []
    for seed in seeds:
        body = {"model": "default", "prompt": "hello there", "max_tokens": 12, "seed": seed}
        r = httpx.post(server.base_url + "/v1/completions", json={**body, **fields}, timeout=60)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


@pytest.fixture(scope="module")
def greedy_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The model ships temperature 0 (greedy); the server sets no flag."""
    root = tmp_path_factory.mktemp("gencfg")
    yield from _serve(root, _model(root, {"temperature": 0.0}))


@pytest.fixture(scope="module")
def flag_over_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The model ships temperature 0; the server's --temperature 1.5 overrides it."""
    root = tmp_path_factory.mktemp("flag")
    yield from _serve(root, _model(root, {"temperature": 0.0}), "--temperature", "1.5")


def test_model_default_applies_when_the_request_is_silent(greedy_config: ServerProcess) -> None:
    assert len(set(_texts(greedy_config, range(4)))) == 1  # greedy: every seed agrees
    # The request's own field wins over the model's default.
    assert len(set(_texts(greedy_config, range(4), temperature=1.5))) > 1


def test_server_flag_wins_over_the_model(flag_over_config: ServerProcess) -> None:
    assert len(set(_texts(flag_over_config, range(4)))) > 1
    assert len(set(_texts(flag_over_config, range(4), temperature=0))) == 1
