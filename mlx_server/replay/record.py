"""Recording request traces: one JSON line per API request, written off the event loop.

The HTTP layer hands each finished request's record to `TraceRecorder.record`, which never
blocks: it puts the record on a bounded trio memory channel (a record that finds the channel full
is dropped, and that is reported once). One writer task (`serve_writer`) drains the channel and
writes whole batches from a worker thread (`trio.to_thread.run_sync`), so neither JSON encoding
nor a slow disk stalls the event loop. An unwritable path or a full disk is logged once; serving
goes on, later records are tried again, and recovery is logged too.

A trace line (format version 1; `mlx_server.replay.trace` reads it back):

    {"v": 1, "session": "...", "request_id": "...", "ts": 1767225600.5, "offset": 12.3,
     "method": "POST", "endpoint": "/v1/chat/completions", "headers": {...}, "body": {...},
     "outcome": {"status": 200, "stream": true, "ttft_ms": 41.2, "duration_ms": 380.0,
                 "prompt_tokens": 25, "completion_tokens": 16, "cached_tokens": 0,
                 "finish_reason": "length", "texts": ["..."]}}

`offset` is the arrival time in seconds since the server started (`session` names that start),
`ts` the arrival's wall-clock time. Lines are appended when a request ends, so they are in order
of completion, not arrival. A body that is not JSON is kept as `raw_body` (text).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from typing import IO, Any

import trio

log = logging.getLogger("mlx_server.trace")

TRACE_VERSION = 1
REDACTED = "[redacted]"
# Headers that carry credentials: recorded only as present ("[redacted]").
SECRET_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "proxy-authorization", "cookie"}
)
# Headers worth keeping to re-send a request or understand it; everything else is left out.
KEPT_HEADERS = frozenset(
    {
        "content-type",
        "accept",
        "user-agent",
        "anthropic-version",
        "anthropic-beta",
        "openai-organization",
        "openai-project",
        "x-request-id",
    }
)
QUEUE_SIZE = 4096  # records waiting for the writer before new ones are dropped


def redact_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The headers a trace keeps, lower-cased, with credentials replaced by `[redacted]`."""
    kept: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if key in SECRET_HEADERS:
            kept[key] = REDACTED
        elif key in KEPT_HEADERS:
            kept[key] = value
    return kept


def encode_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


class TraceRecorder:
    """Appends trace records to `path`; `record` is safe to call from any trio task."""

    def __init__(self, path: str | os.PathLike[str], *, queue_size: int = QUEUE_SIZE) -> None:
        self.path = os.fspath(path)
        self.session = uuid.uuid4().hex[:12]
        self.queue_size = queue_size
        self.started = time.monotonic()  # arrival offsets count from here
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](queue_size)
        self._file: IO[str] | None = None
        self._failing = False  # the last write failed (reported once until one succeeds)
        self._reported = False  # an error was logged: later ones are only debug lines
        self._dropped = 0
        self._broken_tail = False  # a failed write may have left half a line behind
        self.written = 0

    def offset(self, monotonic: float) -> float:
        """Seconds between the server's start and `monotonic` (a `time.monotonic()` value)."""
        return round(monotonic - self.started, 6)

    def record(self, record: dict[str, Any]) -> None:
        """Queue one record for the writer; never waits. Adds the version and session."""
        line = {"v": TRACE_VERSION, "session": self.session, **record}
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "trace writer is behind (%d records waiting); dropping records until it "
                    "catches up",
                    self.queue_size,
                )
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("trace recorder closed; a record was not written")

    def close(self) -> None:
        """No more records: the writer writes what is queued, then returns."""
        self._send.close()

    async def serve_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        """Write queued records until `close`; opening the file is tried (and a failure
        reported) before `task_status.started()`, so a bad path shows at start-up."""
        await trio.to_thread.run_sync(self._open)
        task_status.started()
        try:
            async with self._recv:
                async for first in self._recv:
                    batch = [first]
                    while True:
                        try:
                            batch.append(self._recv.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await trio.to_thread.run_sync(self._write, batch)
        except trio.Cancelled:
            # Shutting down: write what is already queued, without the thread (no more awaits).
            batch = []
            while True:
                try:
                    batch.append(self._recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            if batch:
                self._write(batch)
            raise
        finally:
            self._close_file()

    # -- the worker thread's side ----------------------------------------------------------

    def _open(self) -> bool:
        if self._file is not None:
            return True
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def _write(self, batch: list[dict[str, Any]]) -> None:
        text = "".join(encode_line(record) for record in batch)
        if not self._open():
            return
        assert self._file is not None
        try:
            if self._broken_tail:
                text = "\n" + text  # end a half-written line so the next one parses
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            self._broken_tail = True
            self._close_file()
            self._fail(exc)
            return
        self._broken_tail = False
        self.written += len(batch)
        if self._failing:
            self._failing = False
            log.info("trace recording to %s resumed", self.path)

    def _fail(self, exc: OSError) -> None:
        if self._failing:
            return
        self._failing = True
        if self._reported:
            log.debug("cannot write the trace to %s: %s", self.path, exc)
            return
        self._reported = True
        log.error(
            "cannot write the trace to %s: %s; serving goes on, records are dropped until "
            "writing works again (reported once)",
            self.path,
            exc.strerror or exc,
        )

    def _close_file(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None
