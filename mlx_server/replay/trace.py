"""Reading trace files back: one `TraceEntry` per good line, a `Malformed` note per bad one.

The format is written by `mlx_server.replay.record` (its docstring shows a line). Only
`endpoint` is required, so traces can also be written by hand for load tests: `method` defaults
to POST when there is a body (GET otherwise), `offset` to the previous line's (sent together),
`session` to the previous line's, and `outcome` (what the recording server answered) may be left
out, in which case there is nothing to `--compare` against.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

from .record import REDACTED

_GENERATION_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages"})
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


@attrs.frozen(kw_only=True)
class TraceEntry:
    """One recorded request (and, when the trace has it, what the server answered)."""

    line: int  # 1-based line number in the trace file
    endpoint: str
    method: str = "POST"
    query: str = ""
    session: str = ""
    offset: float = 0.0
    request_id: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    body: Any = None  # parsed JSON, or None
    raw_body: str | None = None
    outcome: dict[str, Any] | None = None

    @property
    def generation(self) -> bool:
        return self.endpoint in _GENERATION_ENDPOINTS and self.method == "POST"

    @property
    def streamed(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def greedy(self) -> bool:
        """Temperature 0: the output is determined by the model and the prompt."""
        if not self.generation or not isinstance(self.body, dict):
            return False
        t = self.body.get("temperature")
        return isinstance(t, int | float) and not isinstance(t, bool) and t == 0

    @property
    def recorded_texts(self) -> list[str] | None:
        """The recorded output of a request that completed normally, else None."""
        out = self.outcome
        if not out or out.get("status") != 200 or out.get("error"):
            return None
        if out.get("finish_reason") in (None, "error", "disconnected", "abort", "timeout"):
            return None
        texts = out.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return None
        return texts

    @property
    def comparable(self) -> bool:
        return self.greedy and self.recorded_texts is not None

    def label(self) -> str:
        rid = f", request {self.request_id}" if self.request_id else ""
        return f"line {self.line}{rid}, {self.method} {self.endpoint}"

    def body_bytes(self) -> bytes:
        if self.body is not None:
            return json.dumps(self.body, ensure_ascii=False).encode()
        if self.raw_body is not None:
            return self.raw_body.encode()
        return b""

    def secret_headers(self) -> list[str]:
        """Names of the credential headers the recorded request sent (values redacted)."""
        return [k for k, v in self.headers.items() if v == REDACTED]


@attrs.frozen
class Malformed:
    line: int
    reason: str


class _Bad(ValueError):
    pass


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Bad(f"'{what}' must be a number")
    return float(value)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"'{what}' must be a string")
    return value


def parse_line(
    text: str, line: int, *, previous: TraceEntry | None = None
) -> TraceEntry:  # raises _Bad
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise _Bad(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object")
    endpoint = _string(obj.get("endpoint"), "endpoint")
    if not endpoint.startswith("/"):
        raise _Bad("'endpoint' must be a path starting with '/'")
    body = obj.get("body")
    if body is not None and not isinstance(body, dict | list):
        raise _Bad("'body' must be a JSON object or array")
    raw_body = obj.get("raw_body")
    if raw_body is not None:
        raw_body = _string(raw_body, "raw_body")
    has_body = body is not None or raw_body is not None
    method = _string(obj.get("method", "POST" if has_body else "GET"), "method").upper()
    if method not in _METHODS:
        raise _Bad(f"unknown method {method!r}")
    headers = obj.get("headers") or {}
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise _Bad("'headers' must be an object of strings")
    outcome = obj.get("outcome")
    if outcome is not None and not isinstance(outcome, dict):
        raise _Bad("'outcome' must be an object")
    offset = obj.get("offset")
    offset = (previous.offset if previous else 0.0) if offset is None else _number(offset, "offset")
    if offset < 0:
        raise _Bad("'offset' must be >= 0")
    session = obj.get("session")
    session = (previous.session if previous else "") if session is None else str(session)
    request_id = obj.get("request_id")
    return TraceEntry(
        line=line,
        endpoint=endpoint,
        method=method,
        query=_string(obj.get("query", ""), "query"),
        session=session,
        offset=offset,
        request_id=request_id if isinstance(request_id, str) else None,
        headers={k.lower(): v for k, v in headers.items()},
        body=body,
        raw_body=raw_body,
        outcome=outcome,
    )


def parse_lines(lines: Iterable[str]) -> tuple[list[TraceEntry], list[Malformed]]:
    """Entries in file order, and the malformed lines (blank lines are ignored)."""
    entries: list[TraceEntry] = []
    bad: list[Malformed] = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            entries.append(parse_line(text, number, previous=entries[-1] if entries else None))
        except _Bad as exc:
            bad.append(Malformed(number, str(exc)))
    return entries, bad


def read_trace(path: str | Path) -> tuple[list[TraceEntry], list[Malformed]]:
    """Read a trace file; a line that is not valid UTF-8 counts as malformed, like bad JSON."""
    with open(path, "rb") as f:
        raw = f.read()
    lines: list[str] = []
    for chunk in raw.split(b"\n"):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append("\x00not utf-8")
    if lines and lines[-1] == "":
        lines.pop()
    return parse_lines(lines)


def arrival_schedule(entries: Sequence[TraceEntry]) -> list[tuple[float, TraceEntry]]:
    """When to send each entry, in seconds from the start of the replay, keeping the recorded
    inter-arrival times. Lines are written when requests end, so each recording session (a
    server run) is sorted by arrival; sessions follow one another in the order they first
    appear, each starting when the previous one's last request arrived."""
    sessions: dict[str, list[TraceEntry]] = {}
    for entry in entries:
        sessions.setdefault(entry.session, []).append(entry)
    schedule: list[tuple[float, TraceEntry]] = []
    base = 0.0
    for members in sessions.values():
        members = sorted(members, key=lambda e: (e.offset, e.line))
        first = members[0].offset
        for entry in members:
            schedule.append((base + entry.offset - first, entry))
        base += members[-1].offset - first
    return schedule
