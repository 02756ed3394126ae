"""Who am I in a distributed launch, and a small launcher for several ranks on one machine.

`mlx.launch` (MLX's own launcher) starts one process per rank and tells each its place through
the environment: `MLX_RANK` plus `MLX_HOSTFILE` (ring: a JSON list of each rank's addresses),
`MLX_WORLD_SIZE` (NCCL) or `MLX_IBV_DEVICES` (JACCL); MPI sets `OMPI_COMM_WORLD_*`/`PMI_*`.
`detect` reads that without importing MLX, so the CLI can decide early whether this process
serves HTTP (rank 0) or only follows rank 0's steps (every other rank).

`python -m mlx_server.distributed.launch -n 2 -- --model DIR ...` does what `mlx.launch -n 2
--backend ring` does on one machine (hostfile on loopback, `MLX_RANK`) and also supervises the
ranks: a signal goes to every rank, and when any rank ends the others are stopped, so the
launcher never leaves orphans and exits with rank 0's status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from .rank0 import Rank0

BACKENDS = ("ring", "nccl", "mpi", "jaccl", "any")


@attrs.frozen(kw_only=True)
class Launch:
    """This process's place in a distributed launch, as the launcher's environment tells it."""

    rank: int
    size: int
    backend: str  # the MLX backend to initialize ("any" when the environment does not say)
    rank0_host: str | None  # rank 0's address, where the workers find its control port


def detect(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None when it runs alone (size 1)."""
    env = os.environ if environ is None else environ
    rank_s = env.get("MLX_RANK") or env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK")
    if rank_s is None:
        return None
    rank = int(rank_s)
    size, backend, host = 1, "any", None
    if env.get("MLX_HOSTFILE"):  # ring: the file (or, from some tools, the JSON itself)
        hosts = _read_hostfile(env["MLX_HOSTFILE"])
        size, backend = len(hosts), "ring"
        if hosts and hosts[0]:
            host = hosts[0][0].rsplit(":", 1)[0]
    elif env.get("MLX_WORLD_SIZE"):
        size, backend, host = int(env["MLX_WORLD_SIZE"]), "nccl", env.get("NCCL_HOST_IP")
    elif env.get("MLX_IBV_DEVICES"):
        size, backend = len(_read_hostfile(env["MLX_IBV_DEVICES"])), "jaccl"
        coordinator = env.get("MLX_JACCL_COORDINATOR")
        host = coordinator.rsplit(":", 1)[0] if coordinator else None
    elif env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE"):
        size = int(env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE") or "1")
        backend = "mpi"
    host = env.get("MLX_SERVER_RANK0_HOST") or host
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a launch of {size} ranks")
    return Launch(rank=rank, size=size, backend=backend, rank0_host=host)


def _read_hostfile(value: str) -> list[list[str]]:
    text = value if value.lstrip().startswith("[") else Path(value).read_text(encoding="utf-8")
    hosts = json.loads(text)
    if not isinstance(hosts, list):
        raise ValueError("MLX_HOSTFILE: expected a JSON list")
    return [h if isinstance(h, list) else [h] for h in hosts]


def open_rank0(settings: Settings) -> Rank0 | None:
    """Rank 0's side of distributed serving, or None when this process runs alone."""
    launch = detect()
    if launch is None:
        return None
    if launch.rank != 0:
        raise ValueError("only rank 0 serves HTTP")
    if len(settings.models) > 1:
        raise ConfigError("distributed serving serves one model: give --model once")
    from .rank0 import Rank0

    return Rank0(launch, parallel=settings.parallel, rank_timeout=settings.rank_timeout)


# --------------------------------------------------------------------------- the launcher


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_environments(
    n: int, backend: str, *, hostfile: str, nccl_port: int
) -> list[dict[str, str]]:
    """The environment variables `mlx.launch` would give each of `n` local ranks."""
    envs: list[dict[str, str]] = []
    for rank in range(n):
        env = {"MLX_RANK": str(rank)}
        if backend == "ring":
            env["MLX_HOSTFILE"] = hostfile
        else:
            env |= {
                "MLX_WORLD_SIZE": str(n),
                "NCCL_HOST_IP": "127.0.0.1",
                "NCCL_PORT": str(nccl_port),
                "CUDA_VISIBLE_DEVICES": str(rank),
            }
        envs.append(env)
    return envs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_server.distributed.launch",
        description="Run mlx-server as N ranks on this machine (ring over loopback, or NCCL "
        "with one GPU per rank). Arguments after -- go to every rank's mlx-server.",
    )
    parser.add_argument("-n", "--ranks", type=int, default=2, help="number of ranks (default 2)")
    parser.add_argument("--backend", choices=("ring", "nccl"), default="ring")
    parser.add_argument(
        "--starting-port", type=int, default=0, help="first ring port (default: free ports)"
    )
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server_args = list(args.server_args)
    if server_args[:1] == ["--"]:
        server_args.pop(0)
    if args.ranks < 1:
        parser.error("--ranks must be >= 1")

    ports = (
        [args.starting_port + i for i in range(args.ranks + 1)]
        if args.starting_port
        else _free_ports(args.ranks + 1)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlx-hosts-", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports[: args.ranks]], f)
        hostfile = f.name
    procs: list[subprocess.Popen[bytes]] = []
    try:
        envs = rank_environments(args.ranks, args.backend, hostfile=hostfile, nccl_port=ports[-1])
        for env in envs:
            cmd = [sys.executable, "-m", "mlx_server", *server_args]
            procs.append(subprocess.Popen(cmd, env={**os.environ, **env}))
            print(f"mlx-server launch: rank {env['MLX_RANK']} pid {procs[-1].pid}", flush=True)
        return _supervise(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        os.unlink(hostfile)


def _supervise(procs: list[subprocess.Popen[bytes]]) -> int:
    """Wait for rank 0; forward SIGINT/SIGTERM to it; stop everyone once rank 0 has ended.

    A worker that ends first is left to rank 0, which notices within its rank timeout and
    exits non-zero by itself; the launcher only kills a rank 0 that outlives that by a lot."""
    deadline = [float("inf")]

    def forward(signum: int, _frame: object) -> None:
        if procs[0].poll() is None:
            procs[0].send_signal(signum)  # rank 0 shuts down and tells the workers to stop
        deadline[0] = min(deadline[0], time.monotonic() + 60)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while procs[0].poll() is None:
            if deadline[0] == float("inf") and any(p.poll() is not None for p in procs[1:]):
                deadline[0] = time.monotonic() + 120
            if time.monotonic() > deadline[0]:
                procs[0].kill()
            time.sleep(0.1)
        for p in procs[1:]:  # workers end when rank 0 does; make sure of it
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        code = procs[0].returncode
        return code if code >= 0 else 128 - code
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
