"""End to end: model management at run time through a real server process.

A fake Hugging Face hub on 127.0.0.1 (`mlx_server.testing.fake_hub`) serves the files of a tiny
random-weight model; the server (run under `loopback_only`, so it cannot reach anything but
loopback) pulls it through `POST /admin/models/pull` with progress events, loads it, generates
from it, unloads it, and unloads it again by itself once idle (`--idle-unload`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest

from mlx_server.testing.fake_hub import FakeHub
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

pytestmark = pytest.mark.slow

KEY = "admin-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = "org/tiny-b"
OLLAMA_REPO = "org/tiny-c"  # pulled through Ollama's /api/pull
IDLE = 3  # --idle-unload seconds
GUARDED_SERVER = """\
import sys
from mlx_server.cli import entry
from mlx_server.testing.fake_hub import loopback_only
with loopback_only():
    entry()
"""


@pytest.fixture(scope="module")
def hub_and_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeHub, ServerProcess]]:
    root = tmp_path_factory.mktemp("admin")
    build_tiny_model(root / "tiny-a")
    build_tiny_model(root / "build-b", seed=1)
    files = {p.name: p.read_bytes() for p in sorted((root / "build-b").iterdir()) if p.is_file()}
    home = root / "hf-home"
    home.mkdir()
    env = {name: "" for name in os.environ if name.startswith(("MLX_SERVER_", "HF_"))}
    env |= {name: "" for name in os.environ if "proxy" in name.lower()}
    env |= {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "*",
        "HF_TOKEN": "",
    }
    # Served a MiB at a time with a pause: the pull takes long enough to report progress.
    fake = FakeHub({REPO: files, OLLAMA_REPO: files}, chunk_size=1 << 20, chunk_delay=0.04)
    with fake as url:
        env["HF_ENDPOINT"] = url
        args = ["--model", str(root / "tiny-a"), "--api-key", KEY, "--idle-unload", str(IDLE)]
        launcher = [sys.executable, "-c", GUARDED_SERVER]
        log = root / "server.log"
        with run_server(args, env=env, log_path=log, launcher=launcher) as server:
            yield fake, server
    assert fake.errors == []


@pytest.fixture(scope="module")
def server(hub_and_server: tuple[FakeHub, ServerProcess]) -> ServerProcess:
    return hub_and_server[1]


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
            name = "message"
    return events


def pull(server: ServerProcess, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    url = f"{server.base_url}/admin/models/pull"
    with httpx.stream("POST", url, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r)


def model_card(server: ServerProcess, name: str) -> dict[str, Any]:
    listed = httpx.get(f"{server.base_url}/v1/models", headers=AUTH).json()
    (card,) = [m for m in listed["data"] if m["id"] == name]
    return card


def test_models_show_state_and_metadata(server: ServerProcess) -> None:
    card = model_card(server, "tiny-a")
    assert {k: card[k] for k in ("id", "object", "owned_by")} == {
        "id": "tiny-a",
        "object": "model",
        "owned_by": "mlx-server",
    }
    assert isinstance(card["created"], int)
    meta = card["metadata"]
    assert meta["state"] in ("loaded", "available")  # it may have idled out already
    assert meta["default"] is True and meta["size_bytes"] > 0
    one = httpx.get(f"{server.base_url}/v1/models/tiny-a", headers=AUTH).json()
    assert one["id"] == "tiny-a" and one["metadata"]["default"] is True


def test_admin_needs_the_key_and_checks_input(server: ServerProcess) -> None:
    base = server.base_url
    for method, path in [("GET", "/admin/models"), ("POST", "/admin/models/pull")]:
        r = httpx.request(method, f"{base}{path}", json={"repo": REPO})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad_pulls = [
        ({"repo": "../../etc"}, "repo"),
        ({"repo": "/abs/path"}, "repo"),
        ({"repo": "org/name/extra"}, "repo"),
        ({"repo": "https://example.com/org/name"}, "repo"),
        ({"repo": REPO, "revision": "../../../x"}, "revision"),
        ({"repo": REPO, "revision": "/main"}, "revision"),
        ({}, "repo"),
        ({"repo": 5}, "repo"),
    ]
    for body, param in bad_pulls:
        r = httpx.post(f"{base}/admin/models/pull", json=body, headers=AUTH)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    for name in ["../tiny-a", "/tmp/model", "org/never-pulled"]:
        r = httpx.post(f"{base}/admin/models/load", json={"model": name}, headers=AUTH)
        assert r.status_code == 404, (name, r.text)
        assert r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{base}/admin/models/unload", json={"model": "nope"}, headers=AUTH)
    assert r.status_code == 404
    r = httpx.post(f"{base}/admin/models/load", content=b"{", headers=AUTH)
    assert r.status_code == 400


def test_pull_with_progress_then_load_generate_unload(
    hub_and_server: tuple[FakeHub, ServerProcess],
) -> None:
    fake, server = hub_and_server
    base = server.base_url
    events = pull(server, {"repo": REPO})
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-1] == "done", events[-1]
    progress = [data for name, data in events if name == "progress"]
    assert progress and progress[-1]["done"] is True
    partial = [p for p in progress if not p["done"]]
    assert partial, progress  # seen before the end
    downloaded = [p["downloaded"] for p in progress]
    assert downloaded == sorted(downloaded)
    assert all(0 <= p["percent"] <= 100 for p in progress)
    assert progress[-1]["downloaded"] == progress[-1]["total"] > 10_000_000  # the weights
    done = events[-1][1]
    assert done["repo"] == REPO and done["complete"] is True and done["status"] == "success"

    # The cache lists it; it is not served until loaded.
    listed = httpx.get(f"{base}/admin/models", headers=AUTH).json()
    (cached,) = [c for c in listed["cache"] if c["repo"] == REPO]
    assert cached["complete"] and not cached["served"]
    assert REPO not in [m["id"] for m in listed["data"]]

    loaded = httpx.post(f"{base}/admin/models/load", json={"model": REPO}, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == REPO and loaded.json()["metadata"]["state"] == "loaded"
    assert loaded.json()["metadata"]["context_length"] == 4096

    body = {"model": REPO, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
    out = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert out.status_code == 200, out.text
    assert out.json()["model"] == REPO and out.json()["usage"]["completion_tokens"] == 5

    unloaded = httpx.post(f"{base}/admin/models/unload", json={"model": REPO}, headers=AUTH)
    assert unloaded.status_code == 200 and unloaded.json()["metadata"]["state"] == "available"
    assert model_card(server, REPO)["metadata"]["state"] == "available"

    # A request loads it again.
    out = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 5

    # Pulling again asks the hub which commit main is at and downloads nothing.
    fake.reset_requests()
    again = pull(server, {"repo": REPO})
    assert again[-1][0] == "done" and fake.downloaded() == []


def test_pull_errors_arrive_as_events(server: ServerProcess) -> None:
    events = pull(server, {"repo": "org/absent"})
    assert [name for name, _ in events] == ["start", "error"]
    error = events[-1][1]["error"]
    assert error["code"] == "pull_failed" and "not found" in error["message"]


def test_unload_refused_while_streaming(server: ServerProcess) -> None:
    base = server.base_url
    body = {
        "model": "tiny-a",
        "prompt": "Count",
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: dropping the iterator would close the connection
        first = next(line for line in lines if line.strip() and not line.startswith(":"))
        assert first.startswith("data: {"), first  # generating
        busy = httpx.post(f"{base}/admin/models/unload", json={"model": "tiny-a"}, headers=AUTH)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy"


def test_idle_models_unload(server: ServerProcess) -> None:
    base = server.base_url
    loaded = httpx.post(f"{base}/admin/models/load", json={"model": "tiny-a"}, headers=AUTH)
    assert loaded.status_code == 200 and loaded.json()["metadata"]["state"] == "loaded"
    unload_in = loaded.json()["metadata"]["unload_in"]
    assert 0 < unload_in <= IDLE
    deadline = time.monotonic() + 60
    while model_card(server, "tiny-a")["metadata"]["state"] != "available":
        assert time.monotonic() < deadline, "not unloaded after 60 s idle"
        time.sleep(0.2)
    assert f"unloading model tiny-a (idle for {IDLE} s)" in server.log()
    # The next request loads it again.
    body = {"model": "tiny-a", "prompt": "Hi", "max_tokens": 2}
    out = httpx.post(f"{base}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert out.status_code == 200
    assert model_card(server, "tiny-a")["metadata"]["state"] == "loaded"


def test_ollama_pull_serves_the_repo(server: ServerProcess) -> None:
    with ollama.Client(host=server.base_url, headers=AUTH, timeout=120) as client:
        parts = list(client.pull(f"hf.co/{OLLAMA_REPO}:latest", stream=True))
        assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
        progress = [part for part in parts if part.total]
        assert progress and progress[-1].completed == progress[-1].total > 10_000_000
        assert all(part.digest and part.digest.startswith("sha256:") for part in progress)
        # Served from now on (not loaded until asked for), as after `ollama pull`.
        assert OLLAMA_REPO in [m.model for m in client.list().models]
        assert model_card(server, OLLAMA_REPO)["metadata"]["state"] == "available"
        out = client.generate(model=OLLAMA_REPO, prompt="Hi", options={"num_predict": 3})
        assert out.done and out.model == OLLAMA_REPO and 1 <= (out.eval_count or 0) <= 3

        assert client.pull(OLLAMA_REPO).status == "success"  # again: nothing to download
        with pytest.raises(ollama.ResponseError) as missing:
            client.pull("org/absent")
        assert missing.value.status_code == 404 and "not found" in missing.value.error
        with pytest.raises(ollama.ResponseError) as bad:
            client.pull("llama3:8b")  # Ollama's own library names are not repo ids
        assert bad.value.status_code == 400 and "repo id" in bad.value.error
