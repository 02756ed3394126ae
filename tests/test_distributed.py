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
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
import trio

from mlx_server.distributed import launch as launch_module
from mlx_server.distributed.group import Group
from mlx_server.distributed.launch import (
    Launch,
    check_parallel,
    detect,
    rank_environments,
    supervise,
    visible_gpus,
)
from mlx_server.distributed.launch import main as launch_main
from mlx_server.distributed.plan import (
    KIND_BEAT,
    KIND_PLAN,
    StepPlan,
    decode_plan,
    encode_plan,
    frame,
    read_frame,
)
from mlx_server.distributed.shard import choose_parallel
from mlx_server.errors import ConfigError, ModelLoadError
from mlx_server.messages import (
    Abort,
    Admit,
    CachedPrefix,
    ConstraintSpec,
    GenerationRequest,
    ReleaseCache,
    SamplingParams,
)
from mlx_server.testing.server import ServerProcess, free_port, run_server
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


def rank_pid(server: ServerProcess, rank: int, timeout: float = 30.0) -> int:
    """The pid the launcher printed for `rank` (awaited within `timeout`)."""
    deadline = time.monotonic() + timeout
    while (match := re.search(rf"launch: rank {rank} pid (\d+)", server.log())) is None:
        assert time.monotonic() < deadline, server.log()
        assert server.process.poll() is None, server.log()
        time.sleep(0.02)
    return int(match.group(1))


def wait_exit(server: ServerProcess, since: float, limit: float) -> float:
    """The launcher's exit status, asserted to come within `limit` seconds of `since`;
    returns the seconds it took."""
    try:
        code = server.process.wait(timeout=max(0.1, since + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {limit:g} s later:\n{server.log()}") from None
    assert code != 0, server.log()
    return time.monotonic() - since


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_losing_rank_1_mid_stream_is_an_in_band_error_and_a_prompt_nonzero_exit(
    how: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """Killed: its connections close (the ring collective fails too). Frozen (SIGSTOP): the
    collective on rank 0 just waits, so only the control connection's silence can tell; the
    launcher then kills the frozen rank itself."""
    timeout = 3.0
    args = ["--model", str(tiny_dir), "--rank-timeout", str(timeout)]
    with run_server(args, log_path=tmp_path / "log", launcher=LAUNCH, ready_timeout=120) as server:
        worker = rank_pid(server, 1)
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
                lost_at = time.monotonic()
                payloads += [ln[6:] for ln in lines if ln.startswith("data: ")]
            error_after = time.monotonic() - lost_at
            assert payloads[-1] == "[DONE]"
            error = json.loads(payloads[-2])["error"]
            # Killed: the ring collective itself may fail first ("connection to a peer was
            # lost"); frozen: only the control connection can tell.
            assert re.search("distributed serving failed: rank 1|peer", error["message"]), error
            contents = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[1:4]]
            assert any(contents), "the failure should come after some text"
            try:
                health = client.get("/health", timeout=5)
                assert health.status_code == 503
                assert health.json()["status"] == "failed"
                assert health.json()["reason"].startswith("distributed serving failed: rank 1")
            except httpx.TransportError:  # already gone: that is what the exit code says
                pass
        # Killed: noticed at once. Frozen: after `timeout` of silence. Then about 2 s to let
        # the error reach the clients, and the launcher kills what is left within 1 s.
        bound = 6.0 if how == "killed" else timeout + 6.0
        took = wait_exit(server, lost_at, bound)
        assert error_after < bound
        print(f"{how}: in-band error after {error_after:.1f} s, launcher exit after {took:.1f} s")
        assert server.process.returncode == 1
        log = server.log()
        lost = "stopped answering" if how == "frozen" else "(closed|lost) its connection"
        assert re.search(f"distributed serving failed: rank 1 {lost}", log), log
        assert f"launch: rank 1 (pid {worker})" in log or how == "killed", log


@pytest.mark.slow  # starts a process
def test_a_rank_killed_at_start_stops_the_group_within_seconds(
    tiny_dir: Path, tmp_path: Path
) -> None:
    args = ["--model", str(tiny_dir), "--rank-timeout", "30"]
    with run_server(args, log_path=tmp_path / "log", launcher=LAUNCH, wait_ready=False) as server:
        os.kill(rank_pid(server, 1), signal.SIGKILL)
        killed_at = time.monotonic()
        # Not the 30 s rank timeout: the launcher sees the rank end, rank 0 the closed control
        # connection (or, if rank 1 had not connected yet, the launcher's SIGTERM).
        took = wait_exit(server, killed_at, 10.0)
    print(f"rank 1 killed at start: group gone after {took:.1f} s")
    assert "the group failed: rank 1 killed by SIGKILL" in server.log(), server.log()


@pytest.mark.slow  # starts a process
def test_a_rank_frozen_at_start_fails_the_start_within_the_rank_timeout(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Rank 1 never arrives: rank 0 answers /health 503 meanwhile, then gives up after
    --rank-timeout with a one-line reason, and the launcher kills the frozen rank."""
    timeout = 3.0
    args = ["--model", str(tiny_dir), "--rank-timeout", str(timeout)]
    with run_server(args, log_path=tmp_path / "log", launcher=LAUNCH, wait_ready=False) as server:
        worker = rank_pid(server, 1)
        os.kill(worker, signal.SIGSTOP)
        try:
            statuses: set[tuple[int, str]] = set()
            deadline = time.monotonic() + 60
            first_answer = None
            while server.process.poll() is None and time.monotonic() < deadline:
                try:
                    r = httpx.get(f"{server.base_url}/health", timeout=2)
                    statuses.add((r.status_code, r.json()["status"]))
                    first_answer = first_answer or time.monotonic()
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            assert first_answer is not None, server.log()
            # The control port opens with HTTP; the limit counts from then.
            took = wait_exit(server, first_answer, timeout + 5.0)
        finally:
            if server.process.poll() is None:
                os.kill(worker, signal.SIGKILL)
    print(f"rank 1 frozen at start: group gone {took:.1f} s after /health first answered")
    assert statuses <= {(503, "loading"), (503, "failed")} and (503, "loading") in statuses
    log = server.log()
    assert f"rank 1 did not connect within {timeout:g} s" in log, log
    assert server.process.returncode == 1


@pytest.mark.slow  # starts a process
def test_joining_the_group_is_bounded_even_while_mlx_holds_the_interpreter(
    tmp_path: Path,
) -> None:
    """`mx.distributed.init` with a peer that never comes blocks with the interpreter lock
    held (the ring backend waits for it forever); the watchdog ends the process."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"]]))
    code = (
        "from mlx_server.distributed.launch import detect\n"
        "from mlx_server.distributed.group import Group\n"
        "Group(detect(), join_timeout=1.5)\n"
        "print('joined')\n"
    )
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - start
    assert done.returncode == 1, done
    assert "joined" not in done.stdout
    assert "Timeout (0:00:01.500000)!" in done.stderr and "group.py" in done.stderr, done.stderr
    assert took < 15, took  # start-up (imports) plus the 1.5 s limit


@pytest.mark.slow  # starts a process
def test_explicit_pipeline_over_nccl_is_refused_at_start() -> None:
    env = {**os.environ, "MLX_RANK": "0", "MLX_WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_server", "--parallel", "pipeline", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("mlx-server: error: --parallel pipeline needs"), done.stderr
    assert "nccl backend does not have" in lines[-1]


# -- units: no MLX, no processes ---------------------------------------------------------------


def test_detect_reads_the_launchers_environment(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.2:5000"], ["10.0.0.3:5000"]]))
    ring = detect({"MLX_RANK": "2", "MLX_HOSTFILE": str(hosts)})
    assert ring == Launch(rank=2, size=3, backend="ring", rank0_host="10.0.0.1", control_port=4999)
    nccl_env = {"MLX_RANK": "0", "MLX_WORLD_SIZE": "2", "NCCL_HOST_IP": "10.1.1.1"}
    nccl = detect({**nccl_env, "NCCL_PORT": "12345"})
    assert nccl == Launch(rank=0, size=2, backend="nccl", rank0_host="10.1.1.1", control_port=12344)
    assert detect({**nccl_env, "MLX_SERVER_CONTROL_PORT": "7000"}).control_port == 7000  # type: ignore[union-attr]
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


class RecordingCollectives:
    """Stands in for `mx.distributed`: a group of `size`, and every all-sum's stream kept."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.inits: list[dict[str, object]] = []
        self.streams: list[object] = []

    def init(self, strict: bool = False, backend: str = "any") -> object:
        self.inits.append({"strict": strict, "backend": backend})
        rank, size = self.rank, self.size

        class FakeGroup:
            def rank(self) -> int:
                return rank

            def size(self) -> int:
                return size

        return FakeGroup()

    def all_sum(self, x: mx.array, /, *, group: object = None, stream: object = None) -> mx.array:
        self.streams.append(stream)
        return x


@pytest.mark.parametrize(
    ("backend", "device"), [("nccl", mx.gpu), ("ring", mx.cpu), ("jaccl", mx.cpu)]
)
def test_start_up_collectives_use_the_stream_their_backend_needs(
    backend: str, device: mx.DeviceType
) -> None:
    """NCCL runs collectives only on a GPU stream; ring and JACCL on the CPU."""
    ops = RecordingCollectives(rank=1, size=2)
    launch = Launch(rank=1, size=2, backend=backend, rank0_host=None)
    group = Group(launch, join_timeout=None, ops=ops)
    group.barrier()
    assert ops.inits == [{"strict": True, "backend": backend}]
    assert ops.streams == [mx.Device(device)]
    # The token exchange stays in the step's graph, on the executor's default stream.
    assert group.share_tokens(mx.array([5, 7])).tolist() == [0, 0]  # rank 1 contributes zeros
    assert ops.streams[-1] is None


def test_a_group_of_another_shape_than_the_launch_is_refused() -> None:
    launch = Launch(rank=0, size=3, backend="nccl", rank0_host=None)
    with pytest.raises(ModelLoadError, match="rank 0 of 2, but the launcher said rank 0 of 3"):
        Group(launch, join_timeout=None, ops=RecordingCollectives(rank=0, size=2))


def test_parallel_modes_per_backend() -> None:
    heads = "3 heads (n_heads) do not divide by 2"
    assert choose_parallel("auto", "nccl", None, 2) == "tensor"
    assert choose_parallel("auto", "ring", None, 2) == "tensor"
    assert choose_parallel("auto", "ring", heads, 2) == "pipeline"
    assert choose_parallel("auto", "jaccl", heads, 2) == "pipeline"
    assert choose_parallel("pipeline", "ring", None, 2) == "pipeline"
    with pytest.raises(ModelLoadError, match=r"do not divide by 2; pipeline .* nccl backend lacks"):
        choose_parallel("auto", "nccl", heads, 2)
    with pytest.raises(ModelLoadError, match="try --parallel pipeline"):
        choose_parallel("tensor", "ring", heads, 2)
    with pytest.raises(ConfigError, match=r"--parallel pipeline needs .* nccl backend"):
        check_parallel("pipeline", "nccl")
    for backend in ("ring", "jaccl", "mpi"):
        check_parallel("pipeline", backend)
    for mode in ("auto", "tensor"):
        check_parallel(mode, "nccl")


def test_visible_gpus_and_one_per_nccl_rank() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]
    envs = rank_environments(
        2, "nccl", hostfile="unused", nccl_port=1234, control_port=4321, gpus=["2", "3"]
    )
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3"]
    assert all(e["MLX_SERVER_CONTROL_PORT"] == "4321" and e["NCCL_PORT"] == "1234" for e in envs)


def test_the_launcher_refuses_more_nccl_ranks_than_gpus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(SystemExit) as exc:
        launch_main(["--backend", "nccl", "-n", "3", "--", "--model", "unused"])
    assert exc.value.code == 2
    assert "needs one GPU per rank: 3 ranks, 2 GPUs visible" in capsys.readouterr().err


def sh(script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sh", "-c", script])


@pytest.fixture
def quick_supervision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_module, "RANK0_FOLLOWS_S", 0.5)
    monkeypatch.setattr(launch_module, "TERM_GRACE_S", 0.5)
    monkeypatch.setattr(launch_module, "WORKER_FOLLOWS_S", 0.5)


@pytest.mark.slow  # starts a process
@pytest.mark.usefixtures("quick_supervision")
def test_supervise_stops_rank_0_when_a_worker_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 0 that ignores SIGTERM gets SIGKILL; the status says the group failed."""
    rank0 = sh("trap '' TERM; while :; do sleep 0.05; done")
    start = time.monotonic()
    code = supervise([rank0, sh("exit 3")])
    assert time.monotonic() - start < 5
    assert code == 128 + signal.SIGKILL
    err = capsys.readouterr().err
    assert "rank 1 (pid" in err and "exited with status 3; stopping the others" in err
    assert "SIGTERM" in err and "SIGKILL" in err
    assert "the group failed: rank 1 exited with status 3" in err


@pytest.mark.slow  # starts a process
@pytest.mark.usefixtures("quick_supervision")
def test_supervise_kills_a_frozen_worker_once_rank_0_has_ended() -> None:
    frozen = sh("kill -STOP $$")
    start = time.monotonic()
    assert supervise([sh("exit 1"), frozen]) == 1
    assert time.monotonic() - start < 5
    assert frozen.returncode == -signal.SIGKILL


@pytest.mark.slow  # starts a process
@pytest.mark.usefixtures("quick_supervision")
def test_supervise_clean_end_is_status_0() -> None:
    assert supervise([sh("sleep 0.2"), sh("exit 0")]) == 0
