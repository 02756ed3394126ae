"""Unit tests of the trace machinery: reading traces, scheduling, SSE parsing, comparing,
the access-log format and the recorder (a real trio writer task against real files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from mlx_server.api.outcome import format_access_line, parse_access_line
from mlx_server.replay.record import TraceRecorder, redact_headers
from mlx_server.replay.run import Result, SSEParser, compare, percentile
from mlx_server.replay.trace import arrival_schedule, parse_lines


def line(**fields: object) -> str:
    return json.dumps(fields)


def test_parse_lines_defaults_and_malformed_lines() -> None:
    entries, bad = parse_lines(
        [
            line(endpoint="/v1/models"),
            "",
            line(endpoint="/v1/chat/completions", body={"temperature": 0}, offset=2.5, session="a"),
            "{not json",
            line(endpoint="v1/no-slash"),
            line(endpoint="/v1/completions", body="a string"),
            line(endpoint="/v1/completions", offset=-1),
            line(endpoint="/v1/completions", body={}),
        ]
    )
    assert [(b.line, b.reason.split(" (")[0]) for b in bad] == [
        (4, "not valid JSON"),
        (5, "'endpoint' must be a path starting with '/'"),
        (6, "'body' must be a JSON object or array"),
        (7, "'offset' must be >= 0"),
    ]
    models, chat, last = entries
    assert (models.line, models.method, models.offset) == (1, "GET", 0.0)
    assert (chat.line, chat.method, chat.offset, chat.session) == (3, "POST", 2.5, "a")
    assert chat.greedy and not chat.comparable  # no recorded outcome
    assert (last.offset, last.session) == (2.5, "a")  # inherited from the line before


def test_recorded_texts_only_for_complete_answers() -> None:
    def entry(**outcome: object) -> bool:
        body = {"temperature": 0}
        [e], _ = parse_lines([line(endpoint="/v1/completions", body=body, outcome=outcome)])
        return e.comparable

    assert entry(status=200, finish_reason="stop", texts=["x"])
    assert not entry(status=200, finish_reason="disconnected", texts=["x"])
    assert not entry(status=200, finish_reason="length", texts=["x"], error="boom")
    assert not entry(status=400, finish_reason=None, texts=[])


def test_arrival_schedule_sorts_each_session_and_chains_sessions() -> None:
    entries, _ = parse_lines(
        [
            line(endpoint="/a", session="s1", offset=11.0),  # written after /b: it ended later
            line(endpoint="/b", session="s1", offset=10.5),
            line(endpoint="/c", session="s1", offset=12.0),
            line(endpoint="/d", session="s2", offset=3.0),  # a later server run
            line(endpoint="/e", session="s2", offset=3.25),
        ]
    )
    schedule = [(t, e.endpoint) for t, e in arrival_schedule(entries)]
    assert schedule == [(0.0, "/b"), (0.5, "/a"), (1.5, "/c"), (1.5, "/d"), (1.75, "/e")]


def test_sse_parser_handles_split_chunks_comments_and_crlf() -> None:
    parser = SSEParser()
    assert parser.feed(b": keepalive\n\nevent: ping\nda") == []
    assert parser.feed(b'ta: {"a": 1}\r\n\r\ndata: [DONE]\n\n') == [
        ("ping", '{"a": 1}'),
        ("", "[DONE]"),
    ]


def test_compare_names_where_outputs_differ() -> None:
    outcome = {"status": 200, "finish_reason": "stop", "texts": ["Hello world"]}
    [entry], _ = parse_lines(
        [line(endpoint="/v1/completions", body={"temperature": 0}, outcome=outcome)]
    )
    same = Result(entry=entry, status=200, texts={0: ["Hello", " world"]})
    assert compare(entry, same) is None
    other = Result(entry=entry, status=200, texts={0: ["Hello there"]})
    assert "choice 0 differs at character 6" in (compare(entry, other) or "")
    failed = Result(entry=entry, status=429, error="busy")
    assert compare(entry, failed) == "status 429 (busy), recorded 200"


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_access_line_round_trip() -> None:
    fields = {"request_id": "a b", "status": 200, "ttft_ms": 1.5, "stream": True, "x": None}
    text = format_access_line(fields)
    assert text == 'request_id="a b" status=200 ttft_ms=1.5 stream=true x=-'
    assert parse_access_line(text) == {
        "request_id": "a b",
        "status": "200",
        "ttft_ms": "1.5",
        "stream": "true",
        "x": "-",
    }


def test_headers_are_kept_selectively_and_secrets_redacted() -> None:
    headers = [
        ("Authorization", "Bearer sk-1"),
        ("X-Api-Key", "sk-2"),
        ("Anthropic-Version", "2023-06-01"),
        ("Cookie", "session=1"),
        ("X-Custom-Token", "sk-3"),
    ]
    assert redact_headers(headers) == {
        "authorization": "[redacted]",
        "x-api-key": "[redacted]",
        "anthropic-version": "2023-06-01",
        "cookie": "[redacted]",
    }


async def test_recorder_writes_lines_in_a_writer_task(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    recorder = TraceRecorder(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve_writer)
        for i in range(5):
            recorder.record({"request_id": f"r{i}", "endpoint": "/v1/models"})
        recorder.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["request_id"] for r in records] == [f"r{i}" for i in range(5)]
    assert all(r["v"] == 1 and r["session"] == recorder.session for r in records)
    recorder.record({"late": True})  # after close: dropped quietly


async def test_an_unwritable_path_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    recorder = TraceRecorder(tmp_path / "file" / "trace.jsonl")
    with caplog.at_level(logging.INFO, logger="mlx_server.trace"):
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.serve_writer)
            for _ in range(3):
                recorder.record({"endpoint": "/v1/models"})
                await trio.testing.wait_all_tasks_blocked()
            recorder.close()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "cannot write the trace" in errors[0].getMessage()
    assert recorder.written == 0


async def test_a_full_queue_drops_records_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = TraceRecorder(tmp_path / "t.jsonl", queue_size=2)
    with caplog.at_level(logging.WARNING, logger="mlx_server.trace"):
        for _ in range(5):  # no writer running: the queue fills
            recorder.record({"endpoint": "/x"})
    assert [r.getMessage()[:26] for r in caplog.records] == ["trace writer is behind (2 "]
