"""The control connection between rank 0 and every other rank: plain TCP beside MLX's own
transport, so that a dead or silent rank is noticed even while a collective that waits for it
blocks the MLX thread forever.

Each worker connects to rank 0, says hello, then both ends send a heartbeat every
`rank_timeout / 5` seconds; rank 0 also sends the step plans on it. A side that sees the
connection close, or hears nothing for `rank_timeout` seconds (at least `LOADING_TIMEOUT` until
every rank has loaded its part of the model: a process busy reading weights can be slow to
answer), treats the other as gone: rank 0
reports the failure (the server then fails its requests in-band and exits non-zero), a worker
exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

from .plan import (
    KIND_BEAT,
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
    """Rank 0's end: accepts the workers, sends them plans and heartbeats, watches them."""

    def __init__(self, size: int, *, rank_timeout: float) -> None:
        self.size = size
        self.rank_timeout = rank_timeout
        self.failure: str | None = None
        self.workers: dict[int, dict[str, object]] = {}  # rank -> its hello (pid, host)
        self._listener: socket.socket | None = None
        self._socks: dict[int, socket.socket] = {}
        self._send_lock = threading.Lock()
        self._notify: list[Callable[[], None]] = []
        self._closed = False
        self._limit = max(rank_timeout, LOADING_TIMEOUT)

    def listen(self, host: str = "") -> int:
        """Bind the control port (any free one) on all interfaces; return it."""
        listener = socket.create_server((host, 0), backlog=self.size)
        self._listener = listener
        return int(listener.getsockname()[1])

    def accept_workers(self, timeout: float) -> None:
        """Wait until every other rank has connected and said hello; then start watching."""
        assert self._listener is not None
        deadline = time.monotonic() + timeout
        while len(self._socks) < self.size - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, self.size)) - set(self._socks))
                raise TimeoutError(f"ranks {missing} did not connect within {timeout:g} s")
            self._listener.settimeout(remaining)
            sock, addr = self._listener.accept()
            sock.settimeout(self.rank_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got = read_frame(sock)
            if got is None or got[0] != KIND_HELLO:
                sock.close()
                continue
            hello = json.loads(got[1])
            rank = int(hello["rank"])
            self._socks[rank] = sock
            self.workers[rank] = {**hello, "address": addr[0]}
            log.info("rank %d connected (pid %s on %s)", rank, hello.get("pid"), addr[0])
        self._listener.close()
        for rank, sock in self._socks.items():
            threading.Thread(
                target=self._watch, args=(rank, sock), name=f"rank{rank}-watch", daemon=True
            ).start()
        threading.Thread(target=self._beat, name="control-beat", daemon=True).start()

    def loaded(self) -> None:
        """Every rank has its part of the model: from now on, `rank_timeout` of silence is
        a failure."""
        self._limit = self.rank_timeout

    def on_failure(self, notify: Callable[[], None]) -> None:
        """Call `notify` (from some thread) once a failure is known; at once if it is."""
        self._notify.append(notify)
        if self.failure is not None:
            notify()

    def publish(self, plan: StepPlan) -> None:
        """Send a step plan to every worker (the executor thread calls this before each step)."""
        if plan.stop:
            self._closed = True  # the workers exit now; their connections closing is expected
        self._send(encode_plan(plan))

    def close(self) -> None:
        self._closed = True
        for sock in self._socks.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- threads ---------------------------------------------------------------------------

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
        if self.failure is not None:
            return
        self.failure = message
        log.error("distributed serving failed: %s", message)
        for notify in self._notify:
            notify()


class Link:
    """A worker's end: connects to rank 0, queues its plans, heartbeats, and ends this process
    when rank 0 goes away."""

    def __init__(self, rank: int, *, rank_timeout: float) -> None:
        self.rank = rank
        self.rank_timeout = rank_timeout
        self.plans: queue.SimpleQueue[StepPlan] = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._limit = max(rank_timeout, LOADING_TIMEOUT)

    def connect(self, host: str, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.rank_timeout)
        hello = {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname()}
        sock.sendall(frame(KIND_HELLO, json.dumps(hello).encode()))
        self._sock = sock
        threading.Thread(target=self._read, name="control-read", daemon=True).start()
        threading.Thread(target=self._beat, name="control-beat", daemon=True).start()

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
            reason = "rank 0 closed the control connection"
        except Silent as exc:
            reason = f"rank 0 stopped answering ({exc})"
        except TimeoutError:
            reason = f"rank 0 stopped in the middle of a message (for {self.rank_timeout:g} s)"
        except OSError as exc:
            reason = f"lost the connection to rank 0 ({exc})"
        if self._stopping:
            return  # the worker loop exits once it has applied the stop plan
        _die(f"rank {self.rank}: {reason}; exiting")


def _die(message: str) -> None:
    """End this process now, from any thread: the MLX thread may be blocked in a collective
    with a peer that is gone, and no cleanup can be trusted to return."""
    log.error("%s", message)
    logging.shutdown()
    try:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(1)
