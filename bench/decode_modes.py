"""Decode speed of the batch engine in process, per engine setting, against raw mlx-lm.

For each model given: raw mlx-lm's `generate_step` (one stream), then our engine with each
combination of `--speculative` (off, auto) and `--dense-matmul` (off, on: every multi-row pass
of a quantized layer dequantizes its weight), at 1 and `--streams` streams, interleaved over
`--repeats` rounds (medians reported). Greedy, random prompts, end-of-sequence ignored.
Decode tokens/s counts tokens after every stream has its first one.

    python -m bench.decode_modes MODEL_DIR [MODEL_DIR ...] --tokens 128 --streams 32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any


def raw(model: Any, prompt: list[int], tokens: int) -> float:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    times = []
    for _ in generate_step(
        mx.array(prompt), model, max_tokens=tokens, sampler=lambda x: mx.argmax(x, -1)
    ):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_server.engine import qmatmul
    from mlx_server.engine.model import load

    from .speculative import engine_run

    for path in args.models:
        loaded = load(path, dense_matmul="off")
        model = loaded.model
        vocab = int(loaded.config["vocab_size"])
        rng = random.Random(0)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt)] for _ in range(args.streams)]
        layers = qmatmul._layers(model)
        results: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            results.setdefault("raw 1", []).append(raw(model, prompts[0], args.tokens))
            for dense in ("off", "on"):
                for layer in layers:  # every multi-row pass dense, or none
                    layer.__class__ = qmatmul.RowsQuantizedLinear
                    layer.dense = (  # type: ignore[attr-defined]
                        frozenset(qmatmul.LADDER) if dense == "on" else frozenset()
                    )
                for spec in ("off", "auto"):
                    for n in sorted({1, args.streams}):
                        key = f"ours {n} spec={spec} dense={dense}"
                        got = engine_run(loaded, prompts[:n], args.tokens, spec, 6)["tok_s"]
                        results.setdefault(key, []).append(got)
        base = statistics.median(results["raw 1"])
        print(f"{path} on {mx.default_device()}: {args.tokens} tokens, medians of {args.repeats}")
        for key, vals in results.items():
            med = statistics.median(vals)
            print(f"  {key:32s} {med:9.1f} tok/s  {med / base:5.2f}x raw 1 stream")
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"model": path, "run": key, "tok_s": vals}) + "\n")


if __name__ == "__main__":
    main()
