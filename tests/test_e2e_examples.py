"""The programs in examples/ run against a real server (a tiny random model): the terminal chat
client (piped input, and Ctrl-C stopping an answer and the server's generation of it), the
openai and anthropic SDK examples, curl.sh, and the shipped example trace."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mlx_server.api.outcome import parse_access_line
from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("examples")
    build_tiny_model(tmp / "tiny-llama")
    env = {n: "" for n in os.environ if n.startswith("MLX_SERVER_") or n == "LOG_LEVEL"}
    # The shipped trace names the default model; the alias lets the tiny model answer it.
    args = ["--model", str(tmp / "tiny-llama"), "--model-aliases", "SmolLM2-135M-Instruct"]
    with run_server(args, env=env, log_path=tmp / "server.log") as server:
        yield server


def example_env(server: ServerProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    return {**env, "MLX_SERVER_URL": server.base_url, "PYTHONUNBUFFERED": "1"}


def run_example(server: ServerProcess, *cmd: str, stdin: str = "") -> str:
    result = subprocess.run(
        list(cmd),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=example_env(server),
    )
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def chat_access_lines(server: ServerProcess) -> list[dict[str, str]]:
    marker = "mlx_server.access: "
    return [
        parse_access_line(line.split(marker, 1)[1])
        for line in server.log().splitlines()
        if marker in line and "endpoint=/v1/chat/completions" in line
    ]


def running(server: ServerProcess) -> int:
    return int(httpx.get(f"{server.base_url}/health", timeout=10).json()["running"])


# --------------------------------------------------------------------------- chat.py


def test_chat_client_keeps_the_conversation(server: ServerProcess) -> None:
    before = len(chat_access_lines(server))
    out = run_example(
        server,
        sys.executable,
        str(EXAMPLES / "chat.py"),
        "--max-tokens",
        "6",
        stdin="Hello there\nAnd once more\n/reset\nHello there\n",
    )
    assert out.count("assistant> ") == 3
    assert "(new conversation)" in out
    lines = chat_access_lines(server)[before:]
    assert len(lines) == 3 and all(line["stream"] == "true" for line in lines)
    first, second, third = (int(line["prompt_tokens"]) for line in lines)
    assert second > first  # the second turn carries the first question and answer
    assert third == first  # after /reset the conversation starts over


def _read_until(
    proc: subprocess.Popen[bytes], seen: bytearray, done: Callable[[bytes], bool], what: str
) -> None:
    """Read the chat client's output into `seen` until `done(seen)`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while not done(bytes(seen)):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {what} in the chat output: {bytes(seen)!r}"
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"chat.py ended early: {bytes(seen)!r}"
            seen += chunk


def test_chat_client_ctrl_c_stops_the_answer_and_the_generation(server: ServerProcess) -> None:
    cmd = [sys.executable, str(EXAMPLES / "chat.py"), "--max-tokens", "100000"]
    with subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=example_env(server),
    ) as proc:
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"Tell me a very long story\n")
            proc.stdin.flush()
            seen = bytearray()
            _read_until(proc, seen, lambda out: b"assistant> " in out, "answer")
            start = seen.index(b"assistant> ") + len(b"assistant> ")
            _read_until(proc, seen, lambda out: len(out) - start >= 20, "tokens")
            assert running(server) == 1

            proc.send_signal(signal.SIGINT)
            _read_until(proc, seen, lambda out: b" [stopped]\n" in out, "[stopped]")
            deadline = time.monotonic() + 15
            while running(server):  # the closed stream ends the generation
                assert time.monotonic() < deadline, "the server kept generating"
                time.sleep(0.05)

            proc.stdin.write(b"/quit\n")  # the client goes on after Ctrl-C
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()

    def stopped() -> list[dict[str, str]]:
        return [x for x in chat_access_lines(server) if x["finish_reason"] == "disconnected"]

    deadline = time.monotonic() + 15
    while not stopped():
        assert time.monotonic() < deadline, "no access line for the stopped answer"
        time.sleep(0.05)
    assert stopped()[-1]["stream"] == "true" and stopped()[-1]["status"] == "200"


# --------------------------------------------------------------------------- SDKs and curl


def test_openai_sdk_example(server: ServerProcess) -> None:
    out = run_example(server, sys.executable, str(EXAMPLES / "openai_sdk.py"))
    assert "model: tiny-llama" in out
    assert "== streamed chat" in out and "tokens]" in out
    # The tiny random model does not call the tool: the example prints its text answer.
    assert "== tool call" in out
    assert "no tool call; the model answered" in out


def test_anthropic_sdk_example(server: ServerProcess) -> None:
    out = run_example(server, sys.executable, str(EXAMPLES / "anthropic_sdk.py"))
    assert "== streamed message" in out and "stop_reason max_tokens" in out
    assert "== tool call" in out
    assert "no tool_use block" in out  # the tiny random model answers in text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(server: ServerProcess) -> None:
    out = run_example(server, "bash", str(EXAMPLES / "curl.sh"))
    assert '"object":"chat.completion"' in out
    assert '"object":"chat.completion.chunk"' in out and "data: [DONE]" in out
    assert '"object":"text_completion"' in out
    assert '"type":"message"' in out and "event: message_stop" in out
    assert "x-request-id: curl-example-1" in out


# --------------------------------------------------------------------------- the example trace


def test_the_example_trace_replays(server: ServerProcess) -> None:
    trace = EXAMPLES / "trace.jsonl"
    cmd = [sys.executable, "-m", "mlx_server.replay", str(trace), "--max-rate", "--json"]
    out = run_example(server, *cmd, "--url", server.base_url)
    summary = json.loads(out)
    assert summary["malformed_lines"] == []
    assert summary["requests"] >= 4 and summary["statuses"] == {"200": summary["requests"]}


@pytest.mark.slow
def test_the_example_trace_matches_the_default_model(default_server: ServerProcess) -> None:
    """The shipped trace was recorded from the default model: its greedy requests replay
    to the same text (all at once, so they are batched together this time)."""
    trace = EXAMPLES / "trace.jsonl"
    cmd = [sys.executable, "-m", "mlx_server.replay", str(trace), "--max-rate", "--compare"]
    result = subprocess.run(
        [*cmd, "--url", default_server.base_url], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 greedy requests: 4 match, 0 differ" in result.stdout
