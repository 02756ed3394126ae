"""Request ids, the access log, `--record-trace` and `python -m mlx_server.replay`, against real
server processes serving a tiny random model.

A session of mixed requests is recorded by one server; a fresh server (whose own trace path is
unwritable, so it also shows that recording failures never stop serving) replays it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_server.api.outcome import parse_access_line
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

MODEL = "tiny-llama"
SECRET = "sk-do-not-record-me"


def clean_env() -> dict[str, str]:
    import os

    return {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll until `condition()` is truthy (the server writes logs and traces on its own time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def replay(trace: Path, server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mlx_server.replay", str(trace), "--url", server.base_url]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def trace_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / MODEL
    build_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def recording(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("recording")
    trace = tmp / "trace.jsonl"
    args = ["--model", str(tiny_dir), "--record-trace", str(trace)]
    with run_server(args, env=clean_env(), log_path=tmp / "server.log") as server:
        yield server, trace


@pytest.fixture(scope="module")
def fresh(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second server; its trace path lies under a regular file, so it can never be written."""
    tmp = tmp_path_factory.mktemp("fresh")
    (tmp / "not-a-dir").write_text("")
    args = ["--model", str(tiny_dir), "--record-trace", str(tmp / "not-a-dir" / "trace.jsonl")]
    with run_server(args, env=clean_env(), log_path=tmp / "server.log") as server:
        yield server


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


def mixed_session(client: httpx.Client) -> list[str]:
    """Chat (whole, streamed, n=2), completions (whole with n=2, streamed with echo), Anthropic
    (whole and streamed), a sampled chat, a refused request and a model listing; each sends
    its own `x-request-id`. Returns the ids."""
    ids: list[str] = []

    def rid() -> dict[str, str]:
        ids.append(f"mixed-{len(ids) + 1}")
        return {"x-request-id": ids[-1]}

    def post(path: str, body: dict[str, Any], **headers: str) -> None:
        r = client.post(path, json=body, headers={**rid(), **headers})
        assert r.status_code in (200, 404), r.text

    def stream(path: str, body: dict[str, Any]) -> None:
        with client.stream("POST", path, json=body, headers=rid()) as r:
            assert r.status_code == 200
            r.read()

    post("/v1/chat/completions", chat("Hello there"), authorization=f"Bearer {SECRET}")
    stream("/v1/chat/completions", chat("Tell me a story", stream=True))
    post("/v1/chat/completions", chat("Two of them", n=2))
    post("/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 10,
                             "temperature": 0, "n": 2})  # fmt: skip
    stream("/v1/completions", {"model": MODEL, "prompt": "The sea", "max_tokens": 10,
                               "temperature": 0, "echo": True, "stream": True})  # fmt: skip
    post("/v1/messages", {"model": MODEL, "max_tokens": 10, "temperature": 0,
                          "messages": [{"role": "user", "content": "Hi"}]},
         **{"x-api-key": SECRET, "anthropic-version": "2023-06-01"})  # fmt: skip
    stream("/v1/messages", {"model": MODEL, "max_tokens": 10, "temperature": 0, "stream": True,
                            "messages": [{"role": "user", "content": "Yo"}]})  # fmt: skip
    post("/v1/chat/completions", chat("Sampled", temperature=0.9, seed=3))
    post("/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user",
                                  "content": "x"}]})  # fmt: skip
    r = client.get("/v1/models", headers=rid())
    assert r.status_code == 200
    return ids


@pytest.fixture(scope="module")
def session_trace(
    recording: tuple[ServerProcess, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The recorded mixed session, alone in its own trace file, in the recorded order."""
    server, trace = recording
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        ids = mixed_session(client)

    def recorded() -> list[str] | None:
        lines = [line for line in trace.read_text().splitlines() if line.strip()]
        mine = [line for line in lines if json.loads(line)["request_id"] in ids]
        return mine if len(mine) == len(ids) else None

    lines = wait_for(lambda: trace.exists() and recorded(), "the session's trace lines")
    out = tmp_path_factory.mktemp("session") / "session.jsonl"
    out.write_text("".join(line + "\n" for line in lines))
    return out


# --------------------------------------------------------------------------- recording


def test_trace_lines_record_requests_and_outcomes(session_trace: Path) -> None:
    text = session_trace.read_text()
    assert SECRET not in text
    lines = {rec["request_id"]: rec for rec in trace_lines(session_trace)}
    assert len(lines) == 10

    first = lines["mixed-1"]
    assert first["v"] == 1 and first["method"] == "POST"
    assert first["endpoint"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == "[redacted]"
    assert first["body"]["messages"][0]["content"] == "Hello there"
    out = first["outcome"]
    assert out["status"] == 200 and out["stream"] is False
    assert out["completion_tokens"] == 12 and out["prompt_tokens"] > 0
    assert out["finish_reason"] == "length"
    assert out["ttft_ms"] > 0 and out["duration_ms"] >= out["ttft_ms"]
    assert len(out["texts"]) == 1 and out["texts"][0]

    assert lines["mixed-2"]["outcome"]["stream"] is True
    assert len(lines["mixed-3"]["outcome"]["texts"]) == 2  # n=2
    assert lines["mixed-3"]["outcome"]["completion_tokens"] == 24
    assert lines["mixed-5"]["outcome"]["texts"][0].startswith("The sea")  # echo is in the text
    assert lines["mixed-6"]["headers"]["x-api-key"] == "[redacted]"
    assert lines["mixed-6"]["headers"]["anthropic-version"] == "2023-06-01"
    assert lines["mixed-9"]["outcome"]["status"] == 404
    assert lines["mixed-10"]["method"] == "GET" and "body" not in lines["mixed-10"]

    # Arrival offsets follow the order the requests were sent in (lines are written as they end).
    offsets = [lines[f"mixed-{i}"]["offset"] for i in range(1, 11)]
    assert offsets == sorted(offsets) and offsets[0] > 0
    assert len({rec["session"] for rec in lines.values()}) == 1


# --------------------------------------------------------------------------- replay


def test_replay_against_a_fresh_server_matches_the_recording(
    session_trace: Path, fresh: ServerProcess
) -> None:
    result = replay(session_trace, fresh, "--compare", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["requests"] == 10
    assert summary["compared"] == 7  # every temperature-0 generation that returned 200
    assert summary["mismatches"] == []
    assert summary["statuses"] == {"200": 9, "404": 1}
    assert summary["errors"] == {"404": 1}
    assert summary["ttft_ms"]["n"] == 3 and summary["ttft_ms"]["p50"] > 0  # the streamed ones
    assert summary["itl_ms"]["n"] > 0 and summary["itl_ms"]["p95"] >= summary["itl_ms"]["p50"]
    assert summary["completion_tokens"] > 0 and summary["tokens_per_s"] > 0
    # Progress: one line per request, on stderr.
    assert result.stderr.count("(line ") == 10


def test_replay_text_summary_and_stream_option(session_trace: Path, fresh: ServerProcess) -> None:
    result = replay(session_trace, fresh, "--max-rate", "--concurrency", "2", "--stream")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "replayed 10 requests" in out
    assert "errors        404: 1" in out
    assert "TTFT          p50" in out and "(8 streamed)" in out  # --stream: every generation
    assert "inter-token   p50" in out
    assert "tokens/s" in out


def test_compare_fails_on_a_changed_output_and_names_the_request(
    session_trace: Path, fresh: ServerProcess, tmp_path: Path
) -> None:
    records = trace_lines(session_trace)
    target = next(i for i, rec in enumerate(records) if rec["request_id"] == "mixed-2")
    records[target]["outcome"]["texts"][0] += " (edited)"
    corrupted = tmp_path / "corrupted.jsonl"
    corrupted.write_text("".join(json.dumps(rec) + "\n" for rec in records))

    result = replay(corrupted, fresh, "--compare", "--max-rate")
    assert result.returncode == 1, result.stdout + result.stderr
    mismatch = [line for line in result.stdout.splitlines() if "MISMATCH" in line]
    assert len(mismatch) == 1
    assert f"line {target + 1}" in mismatch[0] and "mixed-2" in mismatch[0]
    assert "differ" in mismatch[0]
    assert "7 greedy requests: 6 match, 1 differ" in result.stdout


def test_a_malformed_line_is_reported_with_its_number_and_skipped(
    session_trace: Path, fresh: ServerProcess, tmp_path: Path
) -> None:
    lines = session_trace.read_text().splitlines()
    lines.insert(2, '{"endpoint": "/v1/chat/completions", "body": {"messages": [')  # cut short
    lines.insert(5, '["not", "an", "object"]')
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")

    result = replay(broken, fresh, "--compare", "--max-rate", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{broken}:3: malformed line skipped: not valid JSON" in result.stderr
    assert f"{broken}:6: malformed line skipped: not a JSON object" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["requests"] == 10 and summary["mismatches"] == []
    assert [m["line"] for m in summary["malformed_lines"]] == [3, 6]


@pytest.mark.slow  # starts a process
def test_replay_usage_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cmd = [sys.executable, "-m", "mlx_server.replay"]
    result = subprocess.run([*cmd, str(empty)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no requests to replay" in result.stderr
    missing = tmp_path / "missing.jsonl"
    result = subprocess.run([*cmd, str(missing)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot read" in result.stderr


# --------------------------------------------------------------------------- ids and access log


def test_every_response_carries_a_request_id(recording: tuple[ServerProcess, Path]) -> None:
    server, _ = recording
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        ok = client.get("/v1/models")
        missing = client.get("/no/such/route")
        assert missing.status_code == 404
        bad = client.post("/v1/chat/completions", json={"messages": "nope"})
        assert bad.status_code == 400
        ids = [r.headers.get("x-request-id") for r in (ok, missing, bad)]
        assert all(i and i.startswith("req_") for i in ids) and len(set(ids)) == 3

        kept = client.get("/health", headers={"x-request-id": "trace-abc-123"})
        assert kept.headers["x-request-id"] == "trace-abc-123"
        odd = client.get("/health", headers={"x-request-id": "has spaces in it"})
        assert odd.headers["x-request-id"].startswith("req_")  # not a token: replaced

        msg = client.post(
            "/v1/messages",
            json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-request-id": "anthropic-1"},
        )
        assert msg.headers["x-request-id"] == msg.headers["request-id"] == "anthropic-1"
        with client.stream(
            "POST", "/v1/chat/completions", json=chat("x", stream=True, max_tokens=2)
        ) as r:
            assert r.headers["x-request-id"].startswith("req_")


def test_one_access_log_line_per_request(recording: tuple[ServerProcess, Path]) -> None:
    server, _ = recording
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        r = client.post(
            "/v1/chat/completions",
            json=chat("Log me", max_tokens=5),
            headers={"x-request-id": "log-me-1"},
        )
        assert r.status_code == 200
        usage = r.json()["usage"]
        with client.stream(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True},
            headers={"x-request-id": "log-me-2"},
        ) as s:
            s.read()
        client.get("/nowhere", headers={"x-request-id": "log-me-3"})

    def lines(rid: str) -> list[dict[str, str]]:
        found = [
            parse_access_line(line.split("mlx_server.access: ", 1)[1])
            for line in server.log().splitlines()
            if "mlx_server.access: " in line and f"request_id={rid} " in line
        ]
        return found

    for rid in ("log-me-1", "log-me-2", "log-me-3"):
        wait_for(lambda rid=rid: lines(rid), f"the access line of {rid}")

    [whole] = lines("log-me-1")
    assert whole["endpoint"] == "/v1/chat/completions" and whole["method"] == "POST"
    assert whole["status"] == "200" and whole["stream"] == "false"
    assert int(whole["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(whole["completion_tokens"]) == usage["completion_tokens"] == 5
    assert whole["finish_reason"] == "length"
    assert 0 < float(whole["ttft_ms"]) <= float(whole["duration_ms"])

    [streamed] = lines("log-me-2")
    assert streamed["stream"] == "true" and streamed["completion_tokens"] == "4"
    assert streamed["endpoint"] == "/v1/completions" and streamed["finish_reason"] == "length"

    [missing] = lines("log-me-3")
    assert missing["status"] == "404" and missing["endpoint"] == "/nowhere"
    assert missing["prompt_tokens"] == "-" and missing["ttft_ms"] == "-"
    assert missing["finish_reason"] == "-" and float(missing["duration_ms"]) >= 0


def test_a_client_that_leaves_is_logged_and_recorded(
    recording: tuple[ServerProcess, Path],
) -> None:
    server, trace = recording
    body = chat("Go on and on", max_tokens=3000, ignore_eos=True)
    with httpx.Client(base_url=server.base_url, timeout=httpx.Timeout(60, read=1.0)) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            client.post("/v1/chat/completions", json=body, headers={"x-request-id": "leaver-1"})

    def access() -> list[dict[str, str]]:
        return [
            parse_access_line(line.split("mlx_server.access: ", 1)[1])
            for line in server.log().splitlines()
            if "request_id=leaver-1 " in line
        ]

    [line] = wait_for(access, "the access line of the request whose client left")
    assert line["status"] == "499" and line["finish_reason"] == "disconnected"
    assert line["stream"] == "false" and int(line["prompt_tokens"]) > 0
    records = wait_for(
        lambda: [r for r in trace_lines(trace) if r["request_id"] == "leaver-1"], "its trace line"
    )
    assert records[0]["outcome"]["status"] == 499
    assert records[0]["body"]["messages"][0]["content"] == "Go on and on"


# --------------------------------------------------------------------------- recorder failures
# Last in the module: it stops the `fresh` server to be sure every record has been tried.


def test_an_unwritable_trace_path_is_reported_once_and_serving_goes_on(
    fresh: ServerProcess,
) -> None:
    with httpx.Client(base_url=fresh.base_url, timeout=60) as client:
        for _ in range(3):
            r = client.post("/v1/chat/completions", json=chat("Still serving?", max_tokens=2))
            assert r.status_code == 200
    fresh.process.send_signal(signal.SIGTERM)  # the writer tries what is queued, then exits
    assert fresh.process.wait(timeout=30) == 0
    errors = [line for line in fresh.log().splitlines() if "cannot write the trace" in line]
    assert len(errors) == 1, fresh.log()[-3000:]
    assert "ERROR" in errors[0] and "serving goes on" in errors[0]
    assert "Not a directory" in errors[0]
