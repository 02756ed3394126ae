"""Distributed serving: two ranks on this machine (ring backend over loopback) serving a tiny
random-weight llama sharded between them, against the same model in one process.

Greedy output is the single-process output token for token, alone and with 4 concurrent
requests, for tensor and pipeline parallelism; killing rank 1 in the middle of a stream ends
the stream with an in-band error, /health says "failed", and the server exits non-zero."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from mlx_server.distributed.launch import Launch, detect
from mlx_server.distributed.plan import (
    KIND_BEAT,
    KIND_PLAN,
    StepPlan,
    decode_plan,
    encode_plan,
    frame,
    read_frame,
)
from mlx_server.messages import (
    Abort,
    Admit,
    CachedPrefix,
    ConstraintSpec,
    GenerationRequest,
    ReleaseCache,
    SamplingParams,
)
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

PROMPTS = ["Tell me about cats", "x", "the sea and the sky", "prime numbers 1 2 3"]
N_TOKENS = 12
LAUNCH = [sys.executable, "-m", "mlx_server.distributed.launch", "-n", "2", "--"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 query heads, 2 KV heads, hidden 64, MLP 128, 2 layers: everything divides by 2 ranks.
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_model(path, "llama")
    return path


def body(prompt: str, **extra: object) -> dict[str, object]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": N_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        **extra,
    }


def tokens_of(reply: dict[str, object]) -> list[str]:
    choice = reply["choices"][0]  # type: ignore[index]
    return [t["token"] for t in choice["logprobs"]["content"]]


async def ask_all(base_url: str, prompts: list[str], *, concurrent: bool) -> list[list[str]]:
    results: list[list[str]] = [[] for _ in prompts]
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

        async def one(i: int) -> None:
            r = await client.post("/v1/chat/completions", json=body(prompts[i]))
            assert r.status_code == 200, r.text
            results[i] = tokens_of(r.json())

        if concurrent:
            async with trio.open_nursery() as nursery:
                for i in range(len(prompts)):
                    nursery.start_soon(one, i)
        else:
            for i in range(len(prompts)):
                await one(i)
    return results


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """The single-process greedy tokens of every prompt."""
    log = tmp_path_factory.mktemp("single") / "server.log"
    with run_server(["--model", str(tiny_dir)], log_path=log) as server:
        tokens = trio.run(lambda: ask_all(server.base_url, PROMPTS, concurrent=False))
    assert all(len(t) == N_TOKENS for t in tokens)
    return tokens


@pytest.fixture(scope="module", params=["tensor", "pipeline"])
def two_ranks(
    request: pytest.FixtureRequest, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp(f"dist-{request.param}") / "server.log"
    args = ["--model", str(tiny_dir), "--parallel", request.param, "--prefill-chunk", "8"]
    with run_server(args, log_path=log, launcher=LAUNCH, ready_timeout=120) as server:
        yield server
    assert f"{request.param} parallel, rank 1 of 2" in server.log()


async def test_two_ranks_equal_one_process_alone(
    two_ranks: ServerProcess, reference: list[list[str]]
) -> None:
    assert await ask_all(two_ranks.base_url, PROMPTS, concurrent=False) == reference


async def test_two_ranks_equal_one_process_with_4_concurrent_requests(
    two_ranks: ServerProcess, reference: list[list[str]]
) -> None:
    assert await ask_all(two_ranks.base_url, PROMPTS, concurrent=True) == reference


def rank_pid(log: str, rank: int) -> int:
    match = re.search(rf"launch: rank {rank} pid (\d+)", log)
    assert match is not None, log
    return int(match.group(1))


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_losing_rank_1_mid_stream_is_an_in_band_error_and_a_nonzero_exit(
    how: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """Killed: its connections close (the ring collective fails too). Frozen (SIGSTOP): the
    collective on rank 0 just waits, so only the control connection's silence can tell."""
    args = ["--model", str(tiny_dir), "--rank-timeout", "5"]
    with run_server(args, log_path=tmp_path / "log", launcher=LAUNCH, ready_timeout=120) as server:
        worker = rank_pid(server.log(), 1)
        long = body("Tell me a long story", max_tokens=3000, stream=True, logprobs=False)
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            payloads: list[str] = []
            with client.stream("POST", "/v1/chat/completions", json=long) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        payloads.append(line[6:])
                    if len(payloads) >= 4:
                        break
                os.kill(worker, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                payloads += [ln[6:] for ln in lines if ln.startswith("data: ")]
            assert payloads[-1] == "[DONE]"
            error = json.loads(payloads[-2])["error"]
            assert error["message"], error
            contents = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[1:4]]
            assert any(contents), "the failure should come after some text"
            try:
                health = client.get("/health", timeout=5)
                assert health.status_code == 503
                assert health.json()["status"] == "failed"
            except httpx.TransportError:  # already gone: that is what the exit code says
                pass
        try:
            if how == "frozen":  # rank 0 exits by itself; then the launcher waits for rank 1
                deadline = time.monotonic() + 60
                while "stopped answering (silent for 5 s); exiting" not in server.log():
                    assert time.monotonic() < deadline, server.log()
                    time.sleep(0.1)
        finally:
            if how == "frozen":
                os.kill(worker, signal.SIGKILL)
        assert server.process.wait(timeout=60) == 1
        log = server.log()
        lost = "stopped answering" if how == "frozen" else "(closed|lost) its connection"
        assert re.search(f"distributed serving failed: rank 1 {lost}", log), log


# -- units: no MLX, no processes ---------------------------------------------------------------


def test_detect_reads_the_launchers_environment(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"], ["10.0.0.3:5000"]]))
    ring = detect({"MLX_RANK": "2", "MLX_HOSTFILE": str(hosts)})
    assert ring == Launch(rank=2, size=3, backend="ring", rank0_host="10.0.0.1")
    nccl = detect({"MLX_RANK": "0", "MLX_WORLD_SIZE": "2", "NCCL_HOST_IP": "10.1.1.1"})
    assert nccl == Launch(rank=0, size=2, backend="nccl", rank0_host="10.1.1.1")
    assert detect({}) is None
    assert detect({"MLX_RANK": "0", "MLX_HOSTFILE": json.dumps([["127.0.0.1:1"]])}) is None


def test_a_plan_crosses_the_control_connection_intact() -> None:
    request = GenerationRequest(
        request_id="r1",
        prompt_ids=(1, 2, 3),
        sampling=SamplingParams(temperature=0.7, seed=5),
        max_tokens=8,
        constraint=ConstraintSpec.json_object(),
    )
    plan = StepPlan(
        commands=(
            Admit(request=request, prefix=CachedPrefix(handle=3, length=2)),
            Abort(request_id="r0"),
            ReleaseCache(handles=(1, 2)),
        ),
        step=True,
    )
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_plan(plan) + frame(KIND_BEAT))
        kind, payload = read_frame(b) or (b"", b"")
        assert kind == KIND_PLAN and decode_plan(payload) == plan
        assert read_frame(b) == (KIND_BEAT, b"")
        a.shutdown(socket.SHUT_WR)
        assert read_frame(b) is None
