"""Who am I in a distributed launch, and a small launcher for several ranks on one machine.

`mlx.launch` (MLX's own launcher) starts one process per rank and tells each its place through
the environment: `MLX_RANK` plus `MLX_HOSTFILE` (ring: a JSON list of each rank's addresses),
`MLX_WORLD_SIZE` (NCCL) or `MLX_IBV_DEVICES` (JACCL); MPI sets `OMPI_COMM_WORLD_*`/`PMI_*`.
`detect` reads that without importing MLX, so the CLI can decide early whether this process
serves HTTP (rank 0) or only follows rank 0's steps (every other rank).

The control connection (see `control`) needs a port on rank 0 that every rank knows before the
MLX group exists: `MLX_SERVER_CONTROL_PORT` when set, otherwise one below the backend's own
port on rank 0 (the first ring port, `NCCL_PORT`, or the JACCL coordinator's port), which
`mlx.launch` leaves free.

`python -m mlx_server.distributed.launch -n 2 -- --model DIR ...` does what `mlx.launch -n 2
--backend ring` (or `--backend nccl`, one GPU per rank) does on one machine, and also
supervises the ranks: SIGINT/SIGTERM go to rank 0 (which stops the others cleanly), and when
any rank ends the others are stopped within seconds, so the launcher never leaves orphans or
waits on a frozen rank. Its exit status is non-zero whenever a rank failed (`mlx.launch`'s is
not to be relied on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from ..errors import ConfigError

BACKENDS = ("ring", "nccl", "mpi", "jaccl", "any")
CONTROL_PORT_ENV = "MLX_SERVER_CONTROL_PORT"
DEFAULT_CONTROL_PORT = 32322  # one below mlx.launch's default first ring port

# Which backends can carry point-to-point messages (send/recv), which pipeline parallelism
# needs: MLX's NCCL backend has only collectives ("Send not supported in NCCL backend").
PIPELINE_BACKENDS = ("ring", "jaccl", "mpi", "any")


@attrs.frozen(kw_only=True)
class Launch:
    """This process's place in a distributed launch, as the launcher's environment tells it."""

    rank: int
    size: int
    backend: str  # the MLX backend to initialize ("any" when the environment does not say)
    rank0_host: str | None  # rank 0's address, where the workers find its control port
    control_port: int = DEFAULT_CONTROL_PORT


def detect(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None when it runs alone (size 1)."""
    env = os.environ if environ is None else environ
    rank_s = env.get("MLX_RANK") or env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK")
    if rank_s is None:
        return None
    rank = int(rank_s)
    size, backend, host, port = 1, "any", None, DEFAULT_CONTROL_PORT + 1
    if env.get("MLX_HOSTFILE"):  # ring: the file (or, from some tools, the JSON itself)
        hosts = _read_hostfile(env["MLX_HOSTFILE"])
        size, backend = len(hosts), "ring"
        if hosts and hosts[0]:
            host, port = _host_port(hosts[0][0], port)
    elif env.get("MLX_WORLD_SIZE"):
        size, backend, host = int(env["MLX_WORLD_SIZE"]), "nccl", env.get("NCCL_HOST_IP")
        port = int(env.get("NCCL_PORT") or port)
    elif env.get("MLX_IBV_DEVICES"):
        size, backend = len(_read_hostfile(env["MLX_IBV_DEVICES"])), "jaccl"
        coordinator = env.get("MLX_JACCL_COORDINATOR")
        if coordinator:
            host, port = _host_port(coordinator, port)
    elif env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE"):
        size = int(env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE") or "1")
        backend = "mpi"
    host = env.get("MLX_SERVER_RANK0_HOST") or host
    control = int(env.get(CONTROL_PORT_ENV) or port - 1)
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a launch of {size} ranks")
    return Launch(rank=rank, size=size, backend=backend, rank0_host=host, control_port=control)


def _host_port(address: str, default: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else (address, default)


def _read_hostfile(value: str) -> list[list[str]]:
    text = value if value.lstrip().startswith("[") else Path(value).read_text(encoding="utf-8")
    hosts = json.loads(text)
    if not isinstance(hosts, list):
        raise ValueError("MLX_HOSTFILE: expected a JSON list")
    return [h if isinstance(h, list) else [h] for h in hosts]


def check_parallel(parallel: str, backend: str) -> None:
    """Refuse, before anything loads, a parallel mode that `backend` cannot carry."""
    if parallel == "pipeline" and backend not in PIPELINE_BACKENDS:
        raise ConfigError(
            f"--parallel pipeline needs point-to-point messages (send/recv), which MLX's "
            f"{backend} backend does not have; use --parallel tensor (or auto)"
        )


def check_launch(launch: Launch, *, models: int, parallel: str) -> None:
    """What every rank refuses at start: several models, or an unsupported parallel mode."""
    if models > 1:
        raise ConfigError("distributed serving serves one model: give --model once")
    check_parallel(parallel, launch.backend)


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


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The CUDA devices this process may use (ids as `CUDA_VISIBLE_DEVICES` names them), from
    that variable when set, else from `nvidia-smi -L`; None when neither can tell."""
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = [d.strip() for d in value.split(",") if d.strip()]
        # CUDA stops at the first invalid entry (e.g. -1 hides every device).
        valid: list[str] = []
        for d in ids:
            if d.startswith("-"):
                break
            valid.append(d)
        return valid
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU"))]


def rank_environments(
    n: int,
    backend: str,
    *,
    hostfile: str,
    nccl_port: int,
    control_port: int,
    gpus: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """The environment variables `mlx.launch` would give each of `n` local ranks, plus the
    control port; NCCL ranks each get one of `gpus` (default: 0..n-1)."""
    envs: list[dict[str, str]] = []
    for rank in range(n):
        env = {"MLX_RANK": str(rank), CONTROL_PORT_ENV: str(control_port)}
        if backend == "ring":
            env["MLX_HOSTFILE"] = hostfile
        else:
            env |= {
                "MLX_WORLD_SIZE": str(n),
                "NCCL_HOST_IP": "127.0.0.1",
                "NCCL_PORT": str(nccl_port),
                "CUDA_VISIBLE_DEVICES": gpus[rank] if gpus is not None else str(rank),
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
    gpus: list[str] | None = None
    if args.backend == "nccl":
        gpus = visible_gpus()
        if gpus is None:
            parser.error("--backend nccl: cannot tell how many GPUs there are (no nvidia-smi)")
        if args.ranks > len(gpus):
            parser.error(
                f"--backend nccl needs one GPU per rank: {args.ranks} ranks, "
                f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} visible"
            )

    ports = (
        [args.starting_port + i for i in range(args.ranks + 2)]
        if args.starting_port
        else _free_ports(args.ranks + 2)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlx-hosts-", delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in ports[: args.ranks]], f)
        hostfile = f.name
    procs: list[subprocess.Popen[bytes]] = []
    try:
        envs = rank_environments(
            args.ranks,
            args.backend,
            hostfile=hostfile,
            nccl_port=ports[-2],
            control_port=ports[-1],
            gpus=gpus,
        )
        for env in envs:
            cmd = [sys.executable, "-m", "mlx_server", *server_args]
            procs.append(subprocess.Popen(cmd, env={**os.environ, **env}))
            say(f"rank {env['MLX_RANK']} pid {procs[-1].pid}")
        return supervise(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        os.unlink(hostfile)


def say(line: str) -> None:
    print(f"mlx-server launch: {line}", file=sys.stderr, flush=True)


# How long rank 0 gets to end by itself after a worker failed (it notices a closed control
# connection at once and exits within about two seconds), then between SIGTERM and SIGKILL.
RANK0_FOLLOWS_S = 4.0
TERM_GRACE_S = 3.0
# How long a worker may outlive rank 0 (it exits as soon as rank 0 says stop or goes away;
# one still there is stuck, and nothing in it is worth saving).
WORKER_FOLLOWS_S = 1.0
# After SIGINT/SIGTERM (or a worker told to stop), rank 0 drains its requests
# (`--shutdown-grace`, default 10 s) before it ends.
SHUTDOWN_LIMIT_S = 60.0


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def supervise(procs: Sequence[subprocess.Popen[bytes]], *, poll: float = 0.05) -> int:
    """Run until every rank has ended; return the group's exit status.

    SIGINT/SIGTERM go to rank 0, which shuts down and tells the workers to stop (a second one
    kills every rank). When a worker fails while rank 0 runs, rank 0 has `RANK0_FOLLOWS_S` to
    notice and exit by itself, then gets SIGTERM, then SIGKILL `TERM_GRACE_S` later; workers
    still running `WORKER_FOLLOWS_S` after rank 0 ended get SIGKILL. The status is rank 0's
    when it is not 0, 1 when a worker failed first, else 0."""
    signalled: list[int] = []
    first_failure: list[str] = []
    inf = float("inf")
    term_at = [inf] * len(procs)
    kill_at = [inf] * len(procs)

    def forward(signum: int, _frame: object) -> None:
        signalled.append(signum)
        if len(signalled) > 1:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        elif procs[0].poll() is None:
            procs[0].send_signal(signum)
            kill_at[0] = min(kill_at[0], time.monotonic() + SHUTDOWN_LIMIT_S)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    ended: set[int] = set()
    try:
        while len(ended) < len(procs):
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in ended or p.poll() is None:
                    continue
                ended.add(rank)
                code = p.returncode
                if code != 0 and not first_failure and not signalled:
                    first_failure.append(f"rank {rank} {_status(code)}")
                if code != 0 and len(ended) < len(procs):
                    say(f"rank {rank} (pid {p.pid}) {_status(code)}; stopping the others")
                if rank == 0:
                    for w in range(1, len(procs)):
                        kill_at[w] = min(kill_at[w], now + WORKER_FOLLOWS_S)
                elif code == 0:  # rank 0 told it to stop: rank 0 is ending by itself
                    kill_at[0] = min(kill_at[0], now + SHUTDOWN_LIMIT_S)
                else:
                    term_at[0] = min(term_at[0], now + RANK0_FOLLOWS_S)
            for rank, p in enumerate(procs):
                if rank in ended or p.poll() is not None:
                    continue
                if now >= kill_at[rank]:
                    say(f"rank {rank} (pid {p.pid}) still running; SIGKILL")
                    p.kill()
                    kill_at[rank] = inf
                elif now >= term_at[rank]:
                    say(f"rank {rank} (pid {p.pid}) still running; SIGTERM")
                    p.terminate()
                    term_at[rank] = inf
                    kill_at[rank] = min(kill_at[rank], now + TERM_GRACE_S)
            time.sleep(poll)
        code = procs[0].returncode
        if first_failure:
            say(f"the group failed: {first_failure[0]}")
        if code != 0:
            return code if code > 0 else 128 - code
        return 1 if first_failure else 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
