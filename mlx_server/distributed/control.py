"""The control connection between rank 0 and every other rank: plain TCP beside MLX's own
transport, so that a dead or silent rank is noticed even while a collective that waits for it
blocks the MLX thread forever.

Rank 0 listens on a port every rank knows before the MLX group exists (see `launch`). Each
worker connects, says hello, and waits for rank 0's "go" before it calls
`mx.distributed.init`: MLX holds the interpreter lock while it waits in there for its peers, so
every rank is known to be alive before any of them enters it. Both ends send a heartbeat every
`rank_timeout / 5` seconds; rank 0 also sends the step plans on it. A side that sees the
connection close, or hears nothing for `rank_timeout` seconds (at least `LOADING_TIMEOUT` until
every rank has loaded its part of the model: a process busy reading weights can be slow to
answer), treats the other as gone: rank 0
reports the failure to the runtime's callback (the server then fails its requests in-band and
exits non-zero), a worker exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .plan import (
    KIND_BEAT,
    KIND_GO,
    KIND_HELLO,
    KIND_PLAN,
    StepPlan,
    decode_plan,
    encode_plan,
    frame,
    read_frame,
)

log = logging.getLogger(__name__)


LOADING_TIMEOUT = 120.0


def _beat_every(rank_timeout: float) -> float:
    return max(0.05, rank_timeout / 5)


class Silent(Exception):
    """Nothing came from the other side for longer than its limit."""


def _frames(sock: socket.socket, limit: Callable[[], float]) -> Iterator[tuple[bytes, bytes]]:
    """The frames from `sock` until it closes, each awaited at most `limit()` seconds (read
    again while waiting, so a limit lowered meanwhile applies at once); `Silent` past it."""
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            got = _next_frame(sock, selector, limit)
            if got is None:
                return
            yield got


def _next_frame(
    sock: socket.socket, selector: selectors.BaseSelector, limit: Callable[[], float]
) -> tuple[bytes, bytes] | None:
    since = time.monotonic()
    while True:
        if selector.select(timeout=0.1):
            return read_frame(sock)  # a frame once begun has the socket's timeout to finish
        silent = time.monotonic() - since
        if silent > limit():
            raise Silent(f"silent for {limit():g} s")


class Hub:
    """Rank 0's end: accepts the workers, sends them plans and heartbeats, watches them.

    A failure (a rank that never connects within `rank_timeout`, closes its connection, or
    stays silent past the limit) is reported once, from whichever thread sees it, through
    `on_failure(reason)`: the runtime decides what happens then."""

    def __init__(
        self, size: int, *, rank_timeout: float, on_failure: Callable[[str], None]
    ) -> None:
        self.size = size
        self.rank_timeout = rank_timeout
        self.failure: str | None = None
        self.workers: dict[int, dict[str, object]] = {}  # rank -> its hello (pid, host)
        self.arrived = threading.Event()  # every worker has connected (or a failure is known)
        self._on_failure = on_failure
        self._listener: socket.socket | None = None
        self._socks: dict[int, socket.socket] = {}
        self._send_lock = threading.Lock()
        self._fail_lock = threading.Lock()
        self._closed = False
        self._limit = max(rank_timeout, LOADING_TIMEOUT)

    def listen(self, port: int, host: str = "") -> None:
        """Bind the control port on all interfaces and start accepting the workers in a
        thread: each is watched from the moment it connects; those not connected within
        `rank_timeout` are a failure."""
        try:
            self._listener = socket.create_server((host, port), backlog=self.size)
        except OSError as exc:
            raise OSError(f"cannot listen on control port {port}: {exc}") from exc
        threading.Thread(target=self._accept, name="control-accept", daemon=True).start()
        threading.Thread(target=self._beat, name="control-beat", daemon=True).start()

    def go(self) -> None:
        """Tell every worker to join the MLX group now (rank 0 is about to)."""
        self._send(frame(KIND_GO))

    def loaded(self) -> None:
        """Every rank has its part of the model: from now on, `rank_timeout` of silence is
        a failure."""
        self._limit = self.rank_timeout

    def publish(self, plan: StepPlan) -> None:
        """Send a step plan to every worker (the executor thread calls this before each step)."""
        if plan.stop:
            self._closed = True  # the workers exit now; their connections closing is expected
        self._send(encode_plan(plan))

    def close(self) -> None:
        self._closed = True
        self.arrived.set()
        if self._listener is not None:
            self._listener.close()
        with self._send_lock:
            socks = list(self._socks.values())
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- threads ---------------------------------------------------------------------------

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        deadline = time.monotonic() + self.rank_timeout
        try:
            while len(self._socks) < self.size - 1 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(1, self.size)) - set(self._socks))
                    ranks = ", ".join(map(str, missing))
                    self._fail(
                        f"rank{'s' if len(missing) > 1 else ''} {ranks} did not connect "
                        f"within {self.rank_timeout:g} s"
                    )
                    return
                listener.settimeout(min(remaining, 0.5))
                try:
                    sock, addr = listener.accept()
                except TimeoutError:
                    continue
                self._admit(sock, addr[0])
        except OSError as exc:
            if not self._closed:
                self._fail(f"the control port failed: {exc}")
            return
        finally:
            listener.close()
        self.arrived.set()

    def _admit(self, sock: socket.socket, address: str) -> None:
        sock.settimeout(self.rank_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello: dict[str, object] = {}
        try:
            got = read_frame(sock)
            if got is not None and got[0] == KIND_HELLO:
                hello = json.loads(got[1])
            rank = int(str(hello.get("rank", -1)))
        except (OSError, ValueError, AttributeError):
            rank = -1
        if not 0 < rank < self.size or rank in self._socks:
            log.warning("control port: ignoring a connection from %s (no valid hello)", address)
            sock.close()
            return
        with self._send_lock:
            self._socks[rank] = sock
        self.workers[rank] = {**hello, "address": address}
        log.info("rank %d connected (pid %s on %s)", rank, hello.get("pid"), address)
        threading.Thread(
            target=self._watch, args=(rank, sock), name=f"rank{rank}-watch", daemon=True
        ).start()

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            for rank, sock in self._socks.items():
                try:
                    sock.sendall(data)
                except OSError as exc:
                    self._fail(f"rank {rank} is unreachable: {exc}")

    def _beat(self) -> None:
        beat = frame(KIND_BEAT)
        while not self._closed and self.failure is None:
            self._send(beat)
            time.sleep(_beat_every(self.rank_timeout))

    def _watch(self, rank: int, sock: socket.socket) -> None:
        try:
            for _ in _frames(sock, lambda: self._limit):
                pass
            reason = "closed its connection (it exited or died)"
        except Silent as exc:
            reason = f"stopped answering ({exc})"
        except TimeoutError:
            reason = f"stopped in the middle of a message (for {self.rank_timeout:g} s)"
        except OSError as exc:
            reason = f"lost its connection ({exc})"
        if not self._closed:
            self._fail(f"rank {rank} {reason}")

    def _fail(self, message: str) -> None:
        with self._fail_lock:
            if self.failure is not None:
                return
            self.failure = message
        log.error("distributed serving failed: %s", message)
        self.arrived.set()
        self._on_failure(message)


class Link:
    """A worker's end: connects to rank 0, queues its plans, heartbeats, and ends this process
    when rank 0 goes away."""

    def __init__(self, rank: int, *, rank_timeout: float) -> None:
        self.rank = rank
        self.rank_timeout = rank_timeout
        self.plans: queue.SimpleQueue[StepPlan] = queue.SimpleQueue()
        self.go = threading.Event()  # rank 0 said: join the MLX group now
        self._sock: socket.socket | None = None
        self._stopping = False
        self._limit = max(rank_timeout, LOADING_TIMEOUT)

    def connect(self, host: str, port: int, timeout: float) -> None:
        """Connect to rank 0's control port (retrying while rank 0 starts) and say hello;
        `OSError` when it does not answer within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=2)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise OSError(
                        f"rank 0's control port {host}:{port} did not answer within "
                        f"{timeout:g} s ({exc})"
                    ) from exc
                time.sleep(0.1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.rank_timeout)
        hello = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname()}
        sock.sendall(frame(KIND_HELLO, json.dumps(hello).encode()))
        self._sock = sock
        threading.Thread(target=self._read, name="control-read", daemon=True).start()
        threading.Thread(target=self._beat, name="control-beat", daemon=True).start()

    def wait_go(self) -> None:
        """Until rank 0 says everyone has arrived (this process ends if rank 0 goes away)."""
        while not self.go.wait(0.5):
            pass

    def loaded(self) -> None:
        """Every rank has its part of the model (see `Hub.loaded`)."""
        self._limit = self.rank_timeout

    def stopping(self) -> None:
        """Rank 0 said stop: its closing the connection next is expected, not a failure."""
        self._stopping = True

    def _beat(self) -> None:
        assert self._sock is not None
        beat = frame(KIND_BEAT)
        while True:
            try:
                self._sock.sendall(beat)
            except OSError:
                return  # the reader sees the loss too and ends the process
            time.sleep(_beat_every(self.rank_timeout))

    def _read(self) -> None:
        assert self._sock is not None
        try:
            for kind, body in _frames(self._sock, lambda: self._limit):
                if kind == KIND_PLAN:
                    plan = decode_plan(body)
                    if plan.stop:
                        self._stopping = True
                    self.plans.put(plan)
                elif kind == KIND_GO:
                    self.go.set()
            reason = "rank 0 closed the control connection"
        except Silent as exc:
            reason = f"rank 0 stopped answering ({exc})"
        except TimeoutError:
            reason = f"rank 0 stopped in the middle of a message (for {self.rank_timeout:g} s)"
        except OSError as exc:
            reason = f"lost the connection to rank 0 ({exc})"
        if self._stopping:
            return  # the worker loop exits once it has applied the stop plan
        die(f"rank {self.rank}: {reason}; exiting")


def die(message: str) -> None:
    """End this process now, from any thread: the MLX thread may be blocked in a collective
    with a peer that is gone, and no cleanup can be trusted to return."""
    log.error("%s", message)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(1)
