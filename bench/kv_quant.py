"""Quantized KV cache (`--kv-bits`): bytes per token, decode cost at long context, how many
conversations fit in a memory budget, and agreement with the unquantized cache's greedy output.

In process, on the batch engine, one model:

- bytes per token: a stored single-request cache (prompt + output) over its length;
- decode tokens/s of one stream after a prompt of each `--contexts` length (random tokens), or
  with `--filled-contexts`, after a cache filled with that many random keys and values (the
  decode cost is the same, and a CPU takes hours to read a real 16K prompt through a 135M
  model in float32);
- conversations of `--conversation` tokens that fit in `--budget` bytes of KV cache;
- agreement: for a few chat prompts, how many of the first `--tokens` greedy tokens equal
  the unquantized cache's.

    uv run python -m bench.kv_quant                                   # default model, 2K
    uv run python -m bench.kv_quant --contexts 2048,16384 --budget 8G  # (slow on a CPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from typing import Any

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers and say why they are prime.",
)


def run(
    loaded: Any, prompt: list[int], bits: int, group: int, tokens: int
) -> tuple[list[int], float, Any]:
    """Greedy tokens, decode tokens/s, and the finished request's stored state."""
    from mlx_server.engine.batch import BatchEngine
    from mlx_server.messages import (
        Admit,
        GenerationRequest,
        SamplingParams,
        SequenceFinished,
        TokenOut,
    )

    engine = BatchEngine(
        loaded.model,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        vocab_size=int(loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size),
        prefill_chunk=2048,
        kv_bits=bits,
        kv_group_size=group,
    )
    request = GenerationRequest(
        request_id="r",
        prompt_ids=tuple(prompt),
        sampling=SamplingParams(temperature=0.0),
        max_tokens=tokens,
        ignore_eos=True,
    )
    engine.admit(Admit(request=request))
    out: list[int] = []
    times: list[float] = []
    stored = None
    while engine.has_work:
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                out.append(ev.token_id)
                times.append(time.perf_counter())
            elif isinstance(ev, SequenceFinished):
                stored = ev.stored
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return out, tps, stored


def filled_decode(loaded: Any, bits: int, group: int, context: int, tokens: int) -> float:
    """Decode tokens/s of one row whose cache holds `context` random positions (the engine's
    own cache types for `bits`), greedy, timed after a warm-up step."""
    import mlx.core as mx

    from mlx_server.engine.batch import BatchEngine

    engine = BatchEngine(
        loaded.model,
        eos_token_ids=[],
        vocab_size=int(loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size),
        kv_bits=bits,
        kv_group_size=group,
    )
    cache = engine._new_cache()
    args = loaded.model.args
    kv_heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = next(v for _, v in _leaves(loaded.model) if mx.issubdtype(v.dtype, mx.floating)).dtype
    dtype = mx.float32 if dtype == mx.float32 else mx.float16
    for c in cache:
        chunk = 2048
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k = mx.random.normal((1, kv_heads, n, head_dim)).astype(dtype)
            c.update_and_fetch(k, k * 0.5)
            mx.eval(c.state)
    token = mx.array([[1000]])
    times = []
    for _ in range(tokens + 1):
        logits = loaded.model(token, cache=cache)[:, -1, :]
        token = mx.argmax(logits, axis=-1)[:, None]
        mx.eval(token)
        times.append(time.perf_counter())
    return (len(times) - 2) / (times[-1] - times[1])


def _leaves(model: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())  # type: ignore[return-value]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return sum(1 for _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(a, b, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", default="0,8,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--contexts", default="2048")
    ap.add_argument("--filled-contexts", default="", help="e.g. 2048,16384: caches of random KV")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per context")
    ap.add_argument("--tokens", type=int, default=32, help="tokens compared for agreement")
    ap.add_argument("--conversation", type=int, default=8192)
    ap.add_argument("--budget", default="4G", help="KV memory budget (bytes or 4G, 512M)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_server.config import parse_size
    from mlx_server.engine.model import load

    loaded = load(args.model)
    budget = parse_size(args.budget)
    bits_list = [int(b) for b in args.bits.split(",")]
    rows: list[dict[str, Any]] = []
    print(f"model {loaded.name} on {mx.default_device()}, group size {args.group_size}")
    chats = [
        loaded.tokenizer.encode(loaded.template.render([{"role": "user", "content": p}]))
        for p in PROMPTS
    ]
    reference: list[list[int]] = []
    for bits in bits_list:
        row: dict[str, Any] = {"bits": bits, "group_size": args.group_size}
        outs = [run(loaded, c, bits, args.group_size, args.tokens) for c in chats]
        stored = outs[0][2]
        # A single request's buffer grows in steps of 256 positions: count the positions held.
        held = -(-len(stored.token_ids) // 256) * 256 if stored is not None else 1
        per_token = stored.nbytes / held if stored is not None else 0.0
        row["bytes_per_token"] = per_token
        row["conversations_in_budget"] = int(budget // (per_token * args.conversation))
        if bits == 0:
            reference = [o[0] for o in outs]
        agree = [_common_prefix(r, o[0]) for r, o in zip(reference, outs, strict=True)]
        row["agreement_first_tokens"] = agree
        rng = random.Random(0)
        for ctx in (int(c) for c in args.contexts.split(",")):
            prompt = [rng.randrange(1000, 20000) for _ in range(ctx)]
            _, tps, _ = run(loaded, prompt, bits, args.group_size, args.decode)
            row[f"decode_tok_s_{ctx}"] = tps
        for ctx in (int(c) for c in args.filled_contexts.split(",") if c):
            tps = filled_decode(loaded, bits, args.group_size, ctx, args.decode)
            row[f"decode_tok_s_filled_{ctx}"] = tps
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"device": str(mx.default_device()), **r}) + "\n")


if __name__ == "__main__":
    main()
