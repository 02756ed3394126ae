"""The MLX side of a distributed launch: the communication group and the few collectives the
server itself needs (a start-up barrier, every rank taking rank 0's tokens).

Called only on the thread that owns MLX (the executor thread on rank 0, the worker loop on the
others), like every other MLX call in this package.

Joining the group (`mx.distributed.init`) blocks until every peer has joined too, and MLX holds
the interpreter lock meanwhile: no other thread of the process runs, so nothing written in
Python can notice a peer that died in that window or answer a signal. The ranks therefore meet
on the control connection first (see `control`), and the call itself runs under
`faulthandler`'s watchdog, a native thread that ends the process (status 1, with the stack on
stderr) when the call outlives its limit.

Each backend runs its collectives on its own kind of stream: NCCL only on a GPU stream (on a CPU
stream MLX fails with "There is no Stream(gpu, N) in current thread"); ring, JACCL and MPI on
the CPU. The sampled-token all-reduce stays on the executor's default stream, in the step's
graph.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import mlx.core as mx

from ..errors import ModelLoadError
from .launch import Launch

log = logging.getLogger(__name__)


class Collectives(Protocol):
    """The part of `mx.distributed` used here (a fake stands in for it in tests)."""

    def init(self, strict: bool = ..., backend: str = ...) -> Any: ...

    def all_sum(self, x: mx.array, /, *, group: Any = ..., stream: Any = ...) -> mx.array: ...


def collective_stream(backend: str) -> mx.Device:
    """Where `backend` runs the start-up collectives: a GPU stream for NCCL, else the CPU."""
    return mx.Device(mx.gpu if backend == "nccl" else mx.cpu)


class Group:
    """The global MLX group of this launch, joined on the calling thread.

    `join_timeout`: seconds `mx.distributed.init` may take before the process is ended
    (None: no watchdog)."""

    def __init__(
        self,
        launch: Launch,
        *,
        join_timeout: float | None,
        ops: Collectives = mx.distributed,  # type: ignore[assignment]
    ) -> None:
        self.ops = ops
        self.stream = collective_stream(launch.backend)
        log.info("rank %d of %d: joining the %s group", launch.rank, launch.size, launch.backend)
        try:
            with _watchdog(join_timeout):
                group = ops.init(strict=True, backend=launch.backend)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot join the distributed group ({launch.backend} backend, rank "
                f"{launch.rank} of {launch.size}): {exc}"
            ) from exc
        if group.size() != launch.size or group.rank() != launch.rank:
            raise ModelLoadError(
                f"the {launch.backend} group is rank {group.rank()} of {group.size()}, but the "
                f"launcher said rank {launch.rank} of {launch.size}"
            )
        self.group = group
        self.rank: int = group.rank()
        self.size: int = group.size()

    def barrier(self) -> None:
        """Return once every rank has called it (on the backend's start-up stream)."""
        mx.eval(self.ops.all_sum(mx.array(1.0), group=self.group, stream=self.stream))

    def share_tokens(self, tokens: mx.array) -> mx.array:
        """Rank 0's sampled tokens on every rank, kept lazy in the step's graph: whatever the
        sampling (greedy, seeded, or from each process's own random state), all ranks then
        feed the same tokens back and their KV caches stay identical."""
        mine = tokens.astype(mx.int32)
        if self.rank != 0:
            # Zeros that still depend on this rank's own step: with a constant here, MLX could
            # run this all-reduce before the model's own ones, out of order with rank 0's.
            mine = mine * 0
        return self.ops.all_sum(mine, group=self.group).astype(tokens.dtype)


@contextlib.contextmanager
def _watchdog(seconds: float | None) -> Iterator[None]:
    """End the process if the block takes longer than `seconds` (even while a native call
    holds the interpreter lock)."""
    if seconds is None:
        yield
        return
    out = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
    faulthandler.dump_traceback_later(seconds, exit=True, file=out)  # type: ignore[arg-type]
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _has_fileno(stream: object) -> bool:
    try:
        stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return True
