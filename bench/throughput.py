"""Decode throughput: mlx-lm's own generation (no HTTP) vs one stream through our server, and
the aggregate of N concurrent streams. Everything runs on this machine in this run, so the
ratios are meaningful even on a noisy shared host.
For the full comparison (mlx_lm.server too, several workloads, the target ratios) see
`bench/load.py` (`uv run just bench`).

    uv run python -m bench.throughput                       # default model, 48 tokens, 8 streams
    uv run python -m bench.throughput --model PATH --tokens 128 --streams 8
    uv run python -m bench.throughput --tiny                # a tiny random llama (fast)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import trio

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def raw_mlx_lm(model_spec: str | None, tokens: int) -> float:
    """Decode tokens/s of mlx-lm's generate_step on the same weights, greedy, EOS ignored."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_server.engine.model import load

    loaded = load(model_spec)
    ids = loaded.tokenizer.encode(loaded.template.render([{"role": "user", "content": PROMPT}]))
    times: list[float] = []
    for _token, _ in generate_step(
        mx.array(ids), loaded.model, max_tokens=tokens, sampler=lambda lp: mx.argmax(lp, axis=-1)
    ):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


async def one_stream(client: httpx.AsyncClient, tokens: int) -> tuple[float, list[float], int]:
    """Returns (start time, arrival times of content chunks, completion tokens)."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    completion = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    arrivals.append(time.perf_counter())
    return start, arrivals, completion


async def http_bench(base_url: str, tokens: int, streams: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=3600) as client:
        await one_stream(client, 4)  # warm up (and fill the prompt cache, as a chat would)
        _start, arrivals, completion = await one_stream(client, tokens)
        single = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        results: list[tuple[float, list[float], int]] = []

        async def run_one() -> None:
            results.append(await one_stream(client, tokens))

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(run_one)
        wall = time.perf_counter() - t0
        total = sum(c for _, _, c in results)
        first = min(a[0] for _, a, _ in results if a)
        last = max(a[-1] for _, a, _ in results if a)
        decode_tokens = sum(len(a) - 1 for _, a, _ in results if a)
        ttfts = [a[0] - s for s, a, _ in results if a]
    return {
        "single_stream_tok_s": single,
        "single_completion_tokens": completion,
        "aggregate_tok_s_wall": total / wall,
        "aggregate_decode_tok_s": decode_tokens / (last - first),
        "concurrent_ttft_median_s": statistics.median(ttfts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model spec (default: the bundled default model)"
    )
    parser.add_argument("--tiny", action="store_true", help="use a tiny random-weight llama")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()

    from mlx_server.testing.server import run_server

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.tiny:
            from mlx_server.testing.tiny import build_tiny_model

            model = str(Path(tmp) / "tiny-llama")
            build_tiny_model(Path(model), "llama")
        raw = raw_mlx_lm(model, args.tokens)
        print(f"mlx-lm generate_step (no HTTP), 1 stream: {raw:8.2f} tok/s")
        server_args = ["--model", model] if model else []
        with run_server(server_args, log_path=Path(tmp) / "server.log") as server:
            res = trio.run(http_bench, server.base_url, args.tokens, args.streams)
    single, agg = res["single_stream_tok_s"], res["aggregate_decode_tok_s"]
    n = args.streams
    print(f"mlx-server over HTTP, 1 stream:            {single:8.2f} tok/s ({single / raw:.2f}x)")
    print(f"mlx-server, {n} streams, aggregate decode:  {agg:8.2f} tok/s ({agg / raw:.2f}x)")
    print(f"mlx-server, {n} streams, tokens/wall time:  {res['aggregate_tok_s_wall']:8.2f} tok/s")
    print(f"median time to first token, {n} streams:   {res['concurrent_ttft_median_s']:8.2f} s")


if __name__ == "__main__":
    main()
