"""What rank 0 tells the other ranks before each executor step, and how it travels.

Every rank runs the same `BatchEngine`; they stay in lockstep because each applies, in the same
order, the executor commands rank 0 drained from its inbox (admits, aborts, cache releases),
then steps when rank 0 steps. Cancellation, timeouts and disconnects are aborts, so they need
nothing more. Sampled tokens are not in the plan: every rank takes rank 0's tokens inside the
step (see `Group.share_tokens`).

Frames on the control connection: 4-byte big-endian length, one byte of kind, then the body
(a pickled `StepPlan` for plans; JSON for hellos; empty for heartbeats and the start signal).
Both ends are our own processes of the same build, so pickle of our attrs messages is the
simplest faithful encoding.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any, Protocol

import attrs

from ..messages import Abort, Admit, ReleaseCache

PlanCommand = Admit | Abort | ReleaseCache

KIND_HELLO = b"H"
KIND_BEAT = b"B"
KIND_PLAN = b"P"
KIND_GO = b"G"  # rank 0 to every worker: everyone has arrived, join the MLX group now
_HEADER = struct.Struct(">IB")
MAX_FRAME = 1 << 30


@attrs.frozen(kw_only=True)
class StepPlan:
    """One iteration of the executor loop: apply `commands`, then step if `step`.

    `reset`: rank 0's previous step failed and it ended every request (abort_all), so the
    workers do the same first. `stop`: rank 0 is shutting down; the workers exit 0."""

    commands: tuple[PlanCommand, ...] = ()
    step: bool = False
    reset: bool = False
    stop: bool = False


def encode_plan(plan: StepPlan) -> bytes:
    return frame(KIND_PLAN, pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))


def decode_plan(body: bytes) -> StepPlan:
    plan = pickle.loads(body)
    if not isinstance(plan, StepPlan):
        raise ValueError(f"expected a StepPlan, got {type(plan).__name__}")
    return plan


def frame(kind: bytes, body: bytes = b"") -> bytes:
    return _HEADER.pack(len(body), kind[0]) + body


def read_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(kind, body) of the next frame; None at a clean end of stream. Socket timeouts
    propagate (`TimeoutError`), as do resets (`OSError`)."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    length, kind = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise OSError(f"control frame too large ({length} bytes)")
    body = _read_exactly(sock, length) if length else b""
    if body is None:
        raise OSError("control connection closed in the middle of a frame")
    return bytes([kind]), body


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            if got:
                raise OSError("control connection closed in the middle of a frame")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Lockstep(Protocol):
    """What the executor of rank 0 needs from distributed serving (`rank0.Rank0`)."""

    def publish(self, plan: StepPlan) -> None: ...

    def share_tokens(self, tokens: Any) -> Any: ...


def describe_plan(plan: StepPlan) -> str:
    """A plan in a few words, for debug logs."""
    names = [type(c).__name__ for c in plan.commands]
    flags = [f for f in ("step", "reset", "stop") if getattr(plan, f)]
    return " ".join([*names, *flags]) or "nothing"
