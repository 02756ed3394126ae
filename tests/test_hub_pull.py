"""Pulls end to end against a fake hub on 127.0.0.1 (`mlx_server.testing.fake_hub`): the real
huggingface_hub client downloads over HTTP into a temporary cache, in process (through
`hub.pull(endpoint=...)`) and as `mlx-server pull` / `ls` subprocesses (with `HF_ENDPOINT`).

Nothing here can leave the machine: every block that pulls runs under `loopback_only()`, which
refuses, and fails the test on, any connection or name lookup for a host that is not loopback;
the subprocesses run their command under the same guard. huggingface_hub's own files (token,
agent registry) are pointed into the temporary folder."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from mlx_server import hub
from mlx_server.errors import ModelLoadError
from mlx_server.testing.fake_hub import FakeHub, NonLoopbackAccess, git_blob_oid, loopback_only

REPO = "org/name"
MODEL_FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 8}',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}' * 20,
    "tokenizer_config.json": b'{"eos_token": "</s>"}',
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "model.safetensors": bytes(range(256)) * 64,
}
OTHER_FILES = {  # in the repo, not needed to serve it with MLX
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"# a model card\n",
    "pytorch_model.bin": b"\0" * 700,
    "original/consolidated.pth": b"\1" * 300,
}
FILES = {**MODEL_FILES, **OTHER_FILES}
EMPTY_REGISTRY = {"standardEnvVars": [], "harnesses": {}}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache; huggingface_hub's token and agent-registry files under tmp_path (the
    registry fresh, so it is not fetched from the real hub), no token, not offline."""
    home = tmp_path / "hf-home"
    home.mkdir()
    registry = home / ".agent_harnesses.json"
    registry.write_text(json.dumps(EMPTY_REGISTRY))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(registry))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


@contextlib.contextmanager
def serving(fake: FakeHub) -> Iterator[str]:
    """The fake hub's URL, with the block confined to loopback; the hub saw no handler error."""
    with fake as url, loopback_only():
        yield url
    assert fake.errors == []


def snapshot_files(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_pull_writes_the_cache_and_fetches_only_model_files(cache: Path) -> None:
    fake = FakeHub({REPO: FILES}, page_size=3)  # 10 tree entries (9 files, 1 folder): 4 pages
    sha = fake.commit(REPO)
    with serving(fake) as url:
        path = hub.pull(REPO, root=cache, endpoint=url)
        folder = cache / "models--org--name"
        assert path == folder / "snapshots" / sha
        assert snapshot_files(path) == MODEL_FILES
        assert (folder / "refs" / "main").read_text() == sha
        # Blobs are named by the ETag: the sha256 of an LFS file, the git blob id of the others.
        weights = (path / "model.safetensors").resolve()
        assert weights.parent == folder / "blobs"
        assert weights.name == hashlib.sha256(MODEL_FILES["model.safetensors"]).hexdigest()
        config = (path / "config.json").resolve()
        assert config.name == git_blob_oid(MODEL_FILES["config.json"])
        assert sorted(fake.downloaded()) == sorted(MODEL_FILES)
        asked = {r.filename for r in fake.requests if r.kind == "resolve"}
        assert asked == set(MODEL_FILES)  # no HEAD or GET for README, .bin, .pth
        assert fake.count(kind="tree") == 4 and fake.count(kind="info") == 1

        (model,) = hub.list_cached(cache)
        assert model.repo_id == REPO and model.path == path and model.complete
        assert model.files == len(MODEL_FILES)
        assert model.size_bytes == sum(len(d) for d in MODEL_FILES.values())
        assert hub.find_cached(REPO, cache) == model

        # A second pull asks which commit main is at, and serves every file from the cache.
        fake.reset_requests()
        assert hub.pull(REPO, root=cache, endpoint=url) == path
        assert [(r.method, r.kind) for r in fake.requests] == [("GET", "info")]


def test_pull_reports_growing_byte_progress(cache: Path) -> None:
    # huggingface_hub reads a body in 10 MiB pieces: 21 MiB of weights, served a MiB at a time,
    # make progress within the file as well as between files.
    weights = bytes(range(256)) * (21 * 4096)
    files = {**MODEL_FILES, "model.safetensors": weights}
    total = sum(len(d) for d in files.values())
    seen: list[hub.PullProgress] = []
    fake = FakeHub({REPO: files}, chunk_size=1 << 20, chunk_delay=0.04)
    with serving(fake) as url:
        path = hub.pull(REPO, root=cache, endpoint=url, progress=seen.append)
    assert (path / "model.safetensors").read_bytes() == weights
    assert seen[-1] == hub.PullProgress(repo_id=REPO, downloaded=total, total=total, done=True)
    partial = seen[:-1]
    assert len(partial) >= 2, seen
    assert not any(p.done or p.repo_id != REPO for p in partial)
    downloaded = [p.downloaded for p in partial]
    assert downloaded == sorted(set(downloaded)), seen  # strictly increasing
    totals = [p.total for p in partial]
    assert totals == sorted(totals), seen  # the total only grows as file sizes become known
    assert all(0 < p.downloaded <= p.total <= total for p in partial), seen
    assert partial[0].downloaded < total, seen  # seen before the end


def test_unknown_repo_and_revision(cache: Path) -> None:
    fake = FakeHub({REPO: FILES})
    with serving(fake) as url:
        with pytest.raises(ModelLoadError) as missing:
            hub.pull("org/absent", root=cache, endpoint=url)
        assert str(missing.value) == "Hugging Face repo not found: org/absent"
        with pytest.raises(ModelLoadError) as revision:
            hub.pull(REPO, root=cache, endpoint=url, revision="v9")
        assert str(revision.value) == f"Hugging Face repo {REPO}: revision not found"
    assert [(r.kind, r.status) for r in fake.requests] == [("info", 404), ("info", 404)]
    assert hub.list_cached(cache) == []


def test_gated_repo(cache: Path) -> None:
    gated = "org/gated"
    fake = FakeHub({gated: MODEL_FILES}, gated=[gated])
    with serving(fake) as url:
        with pytest.raises(ModelLoadError) as excinfo:
            hub.pull(gated, root=cache, endpoint=url)
    assert str(excinfo.value) == f"Hugging Face repo {gated} is gated: log in first"
    # The hub shows a gated repo's info and tree to anyone; its files answer 401 without a token.
    resolves = [r for r in fake.requests if r.kind == "resolve"]
    assert resolves and all(r.status == 401 and not r.authorized for r in resolves)
    assert fake.downloaded() == []


def test_fake_hub_speaks_the_hub_protocol(cache: Path) -> None:
    """What huggingface_hub does not exercise on a plain pull: ranges, missing files (the hub's
    EntryNotFound, remembered in the cache's .no_exist), 403 on a gated repo for a token holder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    fake = FakeHub({REPO: FILES, "org/gated": MODEL_FILES}, gated=["org/gated"])
    sha = fake.commit(REPO)
    data = FILES["model.safetensors"]
    with serving(fake) as url:
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            cases = [
                ("/org/name/resolve/main/model.safetensors", {"Range": "bytes=10-19"}),
                ("/org/name/resolve/main/model.safetensors", {"Range": "bytes=-5"}),
                ("/org/name/resolve/main/model.safetensors", {"Range": "bytes=99999-"}),
                ("/org/name/resolve/main/nothing.json", {}),
                ("/org/gated/resolve/main/config.json", {"Authorization": "Bearer hf_x"}),
            ]
            answers = []
            for target, headers in cases:  # one kept-alive connection for all of them
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
                answers.append((response.status, dict(response.getheaders()), response.read()))
        finally:
            conn.close()
        (s1, h1, b1), (s2, _, b2), (s3, h3, _), (s4, h4, _), (s5, h5, _) = answers
        assert (s1, b1, h1["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
        assert h1["X-Repo-Commit"] == sha and h1["X-Linked-Size"] == str(len(data))
        assert (s2, b2) == (206, data[-5:])
        assert (s3, h3["Content-Range"]) == (416, f"bytes */{len(data)}")
        assert (s4, h4["X-Error-Code"], h4["X-Repo-Commit"]) == (404, "EntryNotFound", sha)
        assert (s5, h5["X-Error-Code"]) == (403, "GatedRepo")

        with pytest.raises(EntryNotFoundError):
            hf_hub_download(REPO, "nothing.json", cache_dir=cache, endpoint=url)
        assert (cache / "models--org--name" / ".no_exist" / sha / "nothing.json").exists()
        got = hf_hub_download(REPO, "original/consolidated.pth", cache_dir=cache, endpoint=url)
        assert Path(got).read_bytes() == FILES["original/consolidated.pth"]


def test_fake_hub_closes_promptly_mid_transfer() -> None:
    """A client stuck in a slow body and an idle kept-alive connection do not hold up close()."""
    fake = FakeHub({REPO: FILES}, chunk_size=16, chunk_delay=30.0)
    url = fake.start()
    port = int(url.rsplit(":", 1)[1])
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    slow = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        idle.request("GET", "/api/models/org/name")
        assert idle.getresponse().read()  # the connection stays open, its handler waiting
        slow.request("GET", "/org/name/resolve/main/model.safetensors")
        response = slow.getresponse()  # headers sent; the first chunk is 30 s away
        assert response.status == 200
        outcome: list[BaseException] = []

        def read() -> None:
            try:
                response.read()
            except http.client.IncompleteRead as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        started = time.monotonic()
        fake.close()
        assert time.monotonic() - started < 5
        reader.join(timeout=10)
        assert not reader.is_alive()
        assert len(outcome) == 1  # the body was cut short, as the client can tell
    finally:
        idle.close()
        slow.close()
        fake.close()
    assert fake.errors == []


def test_loopback_only_refuses_other_hosts() -> None:
    with pytest.raises(NonLoopbackAccess, match=r"192\.0\.2\.1"):
        with loopback_only():
            with contextlib.suppress(NonLoopbackAccess, OSError):  # swallowed: still a failure
                socket.create_connection(("192.0.2.1", 9), timeout=0.5)
    with loopback_only():  # loopback is fine
        socket.getaddrinfo("127.0.0.1", 80)
        socket.getaddrinfo("localhost", 80)


# ------------------------------------------------------------------ the commands, as processes

GUARDED_CLI = """\
import sys
from mlx_server.cli import main
from mlx_server.testing.fake_hub import loopback_only
with loopback_only():
    status = main(sys.argv[1:])
sys.exit(status)
"""


def _cli(args: list[str], url: str, home: Path) -> subprocess.CompletedProcess[str]:
    """`mlx-server ARGS` (its `main`, under `loopback_only`) with the fake hub as HF_ENDPOINT,
    the cache and huggingface_hub's home in `home`, progress bars forced on (stderr is a pipe)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in name.lower()
    }
    env |= {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "NO_PROXY": "*",
        "TQDM_POSITION": "-1",  # huggingface_hub's switch for bars on a non-terminal
    }
    return subprocess.run(
        [sys.executable, "-c", GUARDED_CLI, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_cli_pull_and_ls(tmp_path: Path) -> None:
    fake = FakeHub({REPO: FILES})
    with fake as url:
        pulled = _cli(["pull", REPO], url, tmp_path)
        assert pulled.returncode == 0, pulled.stderr
        snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / fake.commit(REPO)
        assert pulled.stdout == f"{REPO}: {snapshot}\n"
        assert snapshot_files(snapshot) == MODEL_FILES
        assert f"Fetching {len(MODEL_FILES)} files" in pulled.stderr
        assert "100%" in pulled.stderr, pulled.stderr
        assert sorted(fake.downloaded()) == sorted(MODEL_FILES)
        # huggingface_hub's agent registry, asked of HF_ENDPOINT (once: then kept in HF_HOME)
        assert fake.count(kind="other") == 1

        listed = _cli(["ls"], url, tmp_path)
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.splitlines()
        assert header.split() == ["NAME", "SIZE", "MODIFIED", "STATE"]
        assert row.split()[0] == REPO and row.split()[-1] == "ready"

        missing = _cli(["pull", "org/absent"], url, tmp_path)
        assert missing.returncode == 1
        assert missing.stderr.strip().endswith(
            "mlx-server pull: error: Hugging Face repo not found: org/absent"
        )
    assert fake.errors == []
