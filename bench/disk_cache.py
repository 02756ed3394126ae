"""Prompt cache on disk: time to first token of a long agent prefix after a restart vs cold.

In process, on the batch engine: a random-weight llama of a small real shape (or `--model`)
reads a `--tokens`-token prompt cold; its state is written to a directory by the disk cache's
worker thread; then a new engine with a new index over the same directory (what a restart
starts with) answers a prompt that continues it (the next agent turn). The TTFT of that turn
is compared with reading the same turn cold.

    uv run python -m bench.disk_cache                       # 8,192 tokens, 512-wide 8 layers
    uv run python -m bench.disk_cache --tokens 4096 --model PATH
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def ttft(model: Any, vocab: int, prompt: tuple[int, ...], disk: Any) -> tuple[float, int]:
    from mlx_server.engine.batch import BatchEngine
    from mlx_server.messages import Admit, GenerationRequest, SamplingParams, TokenOut

    engine = BatchEngine(model, eos_token_ids=[], vocab_size=vocab, prefill_chunk=2048, disk=disk)
    request = GenerationRequest(
        request_id="r",
        prompt_ids=prompt,
        sampling=SamplingParams(temperature=0.0),
        max_tokens=2,
        ignore_eos=True,
    )
    start = time.perf_counter()
    progress = engine.admit(Admit(request=request))
    first = None
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut) and first is None:
                first = time.perf_counter() - start
    assert first is not None
    return first, progress.cached


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="a model path (default: a random llama)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_server.engine.disk_cache import DiskCache

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from mlx_server.testing.tiny import build_tiny_model

            model, config = build_tiny_model(
                Path(tmp) / "model",
                "llama",
                hidden_size=512,
                intermediate_size=1536,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                max_position_embeddings=32768,
                scale=1.0,
            )
            vocab, name = int(config["vocab_size"]), "random llama 512x8"
        else:
            from mlx_server.engine.model import load

            loaded = load(args.model)
            model, name = loaded.model, loaded.name
            vocab = int(loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size)
        prefix = tuple((i * 7919) % 20000 + 100 for i in range(args.tokens))
        turn = (*prefix, 11, 12, 13, 14)
        directory = Path(tmp) / "kv"
        disk = DiskCache(directory, budget=1 << 34, model_id=name)
        first_cold, _ = ttft(model, vocab, prefix, disk)
        disk.flush()
        size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        disk.close()
        cold, _ = ttft(model, vocab, turn, None)
        start = time.perf_counter()
        restarted = DiskCache(directory, budget=1 << 34, model_id=name)
        index_s = time.perf_counter() - start
        warm, cached = ttft(model, vocab, turn, restarted)
        restarted.close()
    row = {
        "device": str(mx.default_device()),
        "model": name,
        "prefix_tokens": args.tokens,
        "file_bytes": size,
        "ttft_cold_s": cold,
        "ttft_after_restart_s": warm,
        "index_s": index_s,
        "cached_tokens": cached,
        "first_request_s": first_cold,
    }
    print(
        f"{name} on {row['device']}: {args.tokens}-token prefix ({size / 2**20:.0f} MiB on disk);"
        f" next turn TTFT cold {cold:.2f} s, after a restart {warm:.3f} s "
        f"({cold / warm:.0f}x; {cached} tokens loaded; index read in {index_s * 1000:.0f} ms)"
    )
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
