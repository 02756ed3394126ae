"""The local model library: repo ids checked, the cache listed, pulls that fail cleanly, the
progress reporter, and the `mlx-server ls` / `pull` commands against a cache laid out in a
temporary folder (the hub itself is never reached: its address is a closed local port)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_server import hub

SHA = "0123456789abcdef0123456789abcdef01234567"


def make_cached_repo(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A repo laid out as huggingface_hub writes it: blobs by hash, snapshot symlinks, a ref."""
    folder = root / ("models--" + repo_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True)
    snapshot = folder / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "name",
        "../etc/passwd",
        "org/../x",
        "/abs/path",
        "org/name/extra",
        "org\\name",
        "https://huggingface.co/org/name",
        "org/.hidden",
        "-org/name",
        "org/na me",
        7,
        None,
    ],
)
def test_bad_repo_ids_are_refused(bad: object) -> None:
    with pytest.raises(hub.BadRepoId) as excinfo:
        hub.check_repo_id(bad, param="repo")
    assert excinfo.value.status == 400 and excinfo.value.param == "repo"


@pytest.mark.parametrize("good", ["mlx-community/Qwen3-4B-4bit", "a/b", "Org_1/model.v2-x"])
def test_good_repo_ids(good: str) -> None:
    assert hub.check_repo_id(good) == good


def test_list_cached(tmp_path: Path) -> None:
    assert hub.list_cached(tmp_path / "missing") == []
    make_cached_repo(tmp_path, "org/ready", {"config.json": b"{}", "model.safetensors": b"x" * 10})
    make_cached_repo(tmp_path, "org/partial", {"config.json": b"{}"})
    found = {m.repo_id: m for m in hub.list_cached(tmp_path)}
    assert set(found) == {"org/ready", "org/partial"}
    assert found["org/ready"].complete and not found["org/partial"].complete
    assert found["org/ready"].size_bytes == 12 and found["org/ready"].files == 2
    assert (found["org/ready"].path / "config.json").is_file()
    assert hub.find_cached("org/ready", tmp_path) == found["org/ready"]
    assert hub.find_cached("org/none", tmp_path) is None


def test_progress_reporter_counts_bytes_only() -> None:
    seen: list[hub.PullProgress] = []
    cls = hub._progress_class("org/x", seen.append)
    files = cls(total=3, unit="it")
    files.update(3)
    data = cls(total=1000, unit="B")
    data.update(400)
    files.close()
    data.close()
    assert seen == [hub.PullProgress(repo_id="org/x", downloaded=400, total=1000)]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, "-m", "mlx_server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_cli_ls_and_pull(tmp_path: Path) -> None:
    empty = _cli(["ls"], tmp_path)
    assert empty.returncode == 0 and "no models" in empty.stdout
    make_cached_repo(tmp_path, "org/ready", {"config.json": b"{}", "model.safetensors": b"x"})
    listed = _cli(["ls"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "MODIFIED", "STATE"]
    assert row.split()[0] == "org/ready" and row.split()[-1] == "ready"
    # A cached repo pulls from the cache even though the hub cannot be reached.
    cached = _cli(["pull", "org/ready"], tmp_path)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.strip().endswith(SHA)
    missing = _cli(["pull", "org/absent"], tmp_path)
    assert missing.returncode == 1
    assert "hub is unreachable and the model is not cached" in missing.stderr
    bad = _cli(["pull", "../escape"], tmp_path)
    assert bad.returncode == 1 and "not a Hugging Face repo id" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models--org--ready"]
