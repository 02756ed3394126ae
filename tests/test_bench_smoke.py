"""Keeps `bench.load` from rotting: a tiny-model smoke run must print its table and exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 90


@pytest.mark.slow
def test_bench_load_tiny_quick() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    # Its own session, so that on timeout the benchmark and every server it started go too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.load", "--tiny", "--quick"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark stops its servers on SIGTERM
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"bench.load took over {TIMEOUT_S}s\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"{out}\n{err[-3000:]}"
    assert "TTFT p50" in out and "agg tok/s" in out, out
    number = r"\d+\.\d+"
    for system in ("ours", "mlx_lm.server", "raw fp32"):
        row = re.search(rf"^{re.escape(system)} +1 stream +1/1 .*{number}s .*{number}$", out, re.M)
        assert row, f"no measured '1 stream' row for {system}:\n{out}"
    assert re.search(rf"^ours +4 streams, mixed +4/4 .*{number}$", out, re.M), out
    assert re.search(r"^ours +prefix, cached +1/1 ", out, re.M), out
    assert re.search(rf"ours 1-stream decode / raw fp32 \(same weights\) +{number}", out), out
