"""Client-compatibility tier: the real Codex CLI and Claude Code complete a tool round trip
(a shell command actually run, its output sent back, a final answer) against a scripted model
served by the real server, each inside a network namespace with nothing but loopback.

Not part of the default run: `uv run just clients` installs the pinned CLIs from npm into
`.clients/` and runs this file; without them each test is skipped, saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.clients]

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".clients" / "node_modules" / ".bin"
FINAL = "The marker command printed 42roundtrip."


def _harness(client: str, binary: Path, work: Path) -> dict[str, object]:
    if not binary.exists():
        pytest.skip(f"{binary.name} is not installed: run `uv run just clients`")
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip to isolate the client's network")
    done = subprocess.run(
        ["unshare", "-n", "--", sys.executable, "-m", "mlx_server.testing.agent_clients",
         "--client", client, "--bin", str(binary), "--work", str(work)],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("client", ["codex", "claude"])
def test_tool_round_trip(client: str, tmp_path: Path) -> None:
    report = _harness(client, BIN / client, tmp_path)
    detail = json.dumps(report, indent=1)[-6000:]
    assert report["returncode"] == 0, detail
    assert report["marker"] == "42roundtrip\n", detail  # the shell command really ran
    assert report["final_seen"], detail  # its output went back; the model answered
    access = "\n".join(report["access"])  # type: ignore[arg-type]
    assert "status=200" in access and "status=4" not in access and "status=5" not in access
