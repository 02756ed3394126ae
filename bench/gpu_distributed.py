"""Distributed serving checked end to end on one machine: two ranks against one process.

    python -m bench.gpu_distributed --backend nccl --out DIR    # two GPUs (one per rank)
    python -m bench.gpu_distributed --backend ring --out DIR    # two CPU processes

Steps, each with its own time limit, results appended to DIR/distributed.json:
- the tiny random-weight llama, greedy, 4 prompts x 12 tokens: one process vs two ranks
  (`--parallel auto`, which picks tensor); where tokens differ, the top-2 margins there;
- what a client sees when rank 1 is killed, then frozen (SIGSTOP), in the middle of a stream,
  and how long until the launcher exits;
- refusals at start: more NCCL ranks than GPUs; `--parallel pipeline` over NCCL;
- `speed` (not by default): an 8B-shaped llama with random 4-bit weights, one stream and 16
  concurrent streams of `--tokens` each, one process (one GPU) vs two ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_server.testing.server import ServerProcess, run_server
from mlx_server.testing.tiny import build_tiny_model

PROMPTS = ["Tell me about cats", "x", "the sea and the sky", "prime numbers 1 2 3"]
N_TOKENS = 12


def body(prompt: str, **extra: object) -> dict[str, object]:
    return {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": N_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
        **extra,
    }


def greedy(server: ServerProcess) -> list[list[dict[str, Any]]]:
    out = []
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for prompt in PROMPTS:
            r = client.post("/v1/chat/completions", json=body(prompt))
            r.raise_for_status()
            out.append(r.json()["choices"][0]["logprobs"]["content"])
    return out


def margins(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]]) -> list[str]:
    notes = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for j, (s, t) in enumerate(zip(x, y, strict=True)):
            if s["token"] != t["token"]:
                ms = [
                    round(c["top_logprobs"][0]["logprob"] - c["top_logprobs"][1]["logprob"], 4)
                    for c in (s, t)
                ]
                notes.append(
                    f"prompt {i} token {j}: {s['token']!r} vs {t['token']!r}, "
                    f"top-2 margins {ms[0]} (one) / {ms[1]} (two)"
                )
                break
    return notes


def lose_rank_mid_stream(launcher: list[str], args: list[str], log: Path, how: str) -> dict:
    with run_server(args, log_path=log, launcher=launcher, ready_timeout=300) as server:
        worker = int(re.search(r"launch: rank 1 pid (\d+)", server.log()).group(1))  # type: ignore[union-attr]
        long = body("Tell me a long story", max_tokens=5000, stream=True)
        del long["logprobs"], long["top_logprobs"]
        events: list[str] = []
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json=long) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if len(events) >= 8:
                        break
                os.kill(worker, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                t0 = time.monotonic()
                events += [ln[6:] for ln in lines if ln.startswith("data: ")]
            error_s = time.monotonic() - t0
            try:
                h = client.get("/health", timeout=3)
                health = f"{h.status_code} {h.text.strip()}"
            except httpx.HTTPError as exc:
                health = f"no answer ({type(exc).__name__})"
        code = server.process.wait(timeout=120)
        exit_s = time.monotonic() - t0
    tail = [
        ln
        for ln in log.read_text(errors="replace").splitlines()
        if "failed" in ln or "launch:" in ln
    ][-6:]
    return {
        "how": how,
        "events_before": 8,
        "last_events": events[-2:],
        "error_after_s": round(error_s, 2),
        "health_then": health,
        "launcher_exit": code,
        "launcher_exit_after_s": round(exit_s, 2),
        "log": tail,
    }


SHAPE_8B = {  # Llama-3.1-8B's dimensions, with the tiny model's 49,152-token vocabulary
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
}


def stream_one(base_url: str, tokens: int, prompt: str) -> tuple[float, float, int]:
    """(seconds to the first token, seconds from it to the last, tokens) of one stream."""
    req = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    first = last = 0.0
    n = 0
    with httpx.Client(base_url=base_url, timeout=600) as client:
        with client.stream("POST", "/v1/chat/completions", json=req) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
                elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                    last = time.monotonic() - t0
                    first = first or last
    return first, last - first, n


def speed(model_dir: Path, launcher: list[str] | None, log: Path, tokens: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    args = ["--model", str(model_dir), "--max-batch-size", "32"]
    t0 = time.monotonic()
    with run_server(args, log_path=log, launcher=launcher, ready_timeout=600) as server:
        ready = time.monotonic() - t0
        stream_one(server.base_url, 16, "warm up")
        ttft, decode, n = stream_one(server.base_url, tokens, "Tell me a story")
        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            runs = list(
                pool.map(lambda i: stream_one(server.base_url, tokens, f"story {i}"), range(16))
            )
        wall = time.monotonic() - start
    total = sum(r[2] for r in runs)
    return {
        "ready_s": round(ready, 1),
        "one_stream_tok_s": round((n - 1) / decode, 1),
        "one_stream_ttft_s": round(ttft, 3),
        "16_streams_aggregate_tok_s": round(total / wall, 1),
        "16_streams_tokens": total,
        "16_streams_wall_s": round(wall, 2),
    }


def refused(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    t0 = time.monotonic()
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {
        "cmd": " ".join(cmd[2:]),
        "exit": done.returncode,
        "last_line": lines[-1:],
        "after_s": round(time.monotonic() - t0, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("ring", "nccl"), default="nccl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", default="equal,killed,frozen,refusals")
    parser.add_argument("--shape", help="JSON llama dimensions for the speed step (default 8B)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream (speed)")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "distributed.json"
    steps = a.steps.split(",")
    tiny = a.out / "tiny-llama"
    if not tiny.exists():
        build_tiny_model(tiny, "llama")
    launch = [
        sys.executable,
        "-m",
        "mlx_server.distributed.launch",
        "-n",
        "2",
        "--backend",
        a.backend,
        "--",
    ]
    model = ["--model", str(tiny)]

    def record(name: str, value: object) -> None:
        print(name, json.dumps(value, indent=1), flush=True)
        with results.open("a") as f:
            f.write(json.dumps({"step": name, "result": value}) + "\n")

    if "equal" in steps:
        t0 = time.monotonic()
        with run_server(model, log_path=a.out / "one.log", ready_timeout=400) as one:
            ready_one = time.monotonic() - t0
            ref = greedy(one)
        t0 = time.monotonic()
        args = [*model, "--prefill-chunk", "8"]
        with run_server(
            args, log_path=a.out / "two.log", launcher=launch, ready_timeout=400
        ) as two:
            ready_two = time.monotonic() - t0
            got = greedy(two)
            note = re.findall(r"(\w+ parallel, rank \d of \d)", two.log())
        same = [[t["token"] for t in x] for x in ref] == [[t["token"] for t in x] for x in got]
        record(
            "equal",
            {
                "same_greedy_tokens": same,
                "differences": margins(ref, got),
                "sharding": sorted(set(note)),
                "ready_one_s": round(ready_one, 1),
                "ready_two_s": round(ready_two, 1),
            },
        )
    for how in ("killed", "frozen"):
        if how in steps:
            args = [*model, "--rank-timeout", "5"]
            record(how, lose_rank_mid_stream(launch, args, a.out / f"{how}.log", how))
    if "speed" in steps:
        import bench.gpu_model as gpu_model

        shape = json.loads(a.shape) if a.shape else SHAPE_8B
        gpu_model.SHAPES["custom"] = shape
        big = a.out / "big-model"
        if not big.exists():
            t0 = time.monotonic()
            note = gpu_model.build(big, tiny, "custom", 4, "bf16", 0)
            record("built", {"note": note, "s": round(time.monotonic() - t0, 1)})
        one = speed(big, None, a.out / "speed-one.log", a.tokens)
        record("speed_one_process", one)
        two = speed(big, launch, a.out / "speed-two.log", a.tokens)
        record("speed_two_ranks", two)
    if "refusals" in steps and a.backend == "nccl":
        more = [
            sys.executable,
            "-m",
            "mlx_server.distributed.launch",
            "-n",
            "3",
            "--backend",
            "nccl",
            "--",
            *model,
        ]
        record("three_ranks", refused(more))
        pipe = [
            sys.executable,
            "-m",
            "mlx_server.distributed.launch",
            "-n",
            "2",
            "--backend",
            "nccl",
            "--",
            *model,
            "--parallel",
            "pipeline",
            "--port",
            "8123",
        ]
        record("pipeline", refused(pipe))


if __name__ == "__main__":
    main()
