"""The constrained decoder as vLLM (`structured_outputs`, `guided_*`) and llama.cpp (top-level
`json_schema`, `grammar`) expose it, on a random-weight model sampled at temperature 1: every
output follows its constraint; bad or doubled constraints are 400s naming the field before
anything is generated."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("structured")
    build_tiny_model(root / "tiny", "llama")
    env = {name: "" for name in os.environ if name.startswith("MLX_SERVER_")}
    with run_server(["--model", str(root / "tiny")], env=env, log_path=root / "server.log") as srv:
        yield srv


def _chat(server: ServerProcess, seed: int, **fields: Any) -> httpx.Response:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "answer"}],
        "temperature": 1.0,
        "max_tokens": 48,
        "seed": seed,
        **fields,
    }
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return choice["message"]["content"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_constraint_is_followed(server: ServerProcess, seed: int) -> None:
    assert re.fullmatch(
        r"[0-9]{3}-[a-z]{2}",
        _text(_chat(server, seed, structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"})),
    )
    pick = _text(_chat(server, seed, structured_outputs={"choice": ["red", "green", "blue"]}))
    assert pick in {"red", "green", "blue"}
    for fields in (
        {"structured_outputs": {"json": SCHEMA}},
        {"guided_json": json.dumps(SCHEMA)},
        {"json_schema": SCHEMA},
    ):
        jsonschema.validate(json.loads(_text(_chat(server, seed, **fields))), SCHEMA)
    assert isinstance(
        json.loads(_text(_chat(server, seed, structured_outputs={"json_object": True}))), dict
    )
    lark = 'start: "x" ("," "x")*'
    assert re.fullmatch(r"x(,x)*", _text(_chat(server, seed, grammar=lark)))
    assert _text(_chat(server, seed, guided_choice=["only"])) == "only"


def test_completions_take_them_too(server: ServerProcess) -> None:
    body = {"model": "default", "prompt": "x", "max_tokens": 16, "temperature": 1.0,
            "guided_regex": "[ab]{4}"}  # fmt: skip
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert re.fullmatch("[ab]{4}", r.json()["choices"][0]["text"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"grammar": "start: ((("}, "grammar"),
        ({"json_schema": {"type": "object"}, "guided_regex": "a"}, "json_schema"),
        ({"response_format": {"type": "json_object"}, "json_schema": {}}, "json_schema"),
    ],
)
def test_bad_constraints_are_400s(
    server: ServerProcess, fields: dict[str, Any], param: str
) -> None:
    r = _chat(server, 0, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
