"""Prompt-lookup speculative decoding: decode speed with and without drafts, in process.

Two workloads, greedy, end-of-sequence ignored:

- copy: the prompt holds a Python file of `--lines` lines and asks for it back with one
  function renamed (what a coding agent does when it re-emits a file it edits);
- chat: "Write a long story about ..." (nothing in the prompt to copy).

For each: raw mlx-lm (`generate_step`, one stream), then our batch engine with `--speculative`
off and auto, one stream and `--streams` streams (each stream its own file / topic). Decode
tokens/s counts the tokens generated after every stream has its first token (prefill excluded),
over the time they took. The greedy tokens with and without drafts are compared stream by stream
(they should be identical; a difference at a near-tie can come from the verification pass
computing a position in a batch of several instead of alone).

"auto" is the engine's policy itself, whatever the device (the server resolves `--speculative
auto` to off on a CPU, where drafting measured slower).

What the acceptance rate measures depends on the model: it is high only when the model really
copies. Use a real instruct model (the default SmolLM2) for figures; a random-weight model
shows only the cost of drafting when drafts fail (`--model` a tiny dir: the chat figures).

    uv run python -m bench.speculative                        # default model, CPU-sized
    uv run python -m bench.speculative --lines 300 --tokens 256 --streams 8   # GPU-sized
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

TOPICS = (
    "a lighthouse keeper and the sea",
    "a dragon who is afraid of heights",
    "two robots who open a bakery",
    "a detective cat in Paris",
    "the last tree on Mars",
    "a librarian who can hear books",
    "a time traveller stuck on a Tuesday",
    "a village under a frozen lake",
)


def source_file(lines: int, seed: int) -> str:
    """A plausible Python file of about `lines` lines (deterministic per seed)."""
    out = [f'"""Utilities for inventory batch {seed}."""', "", "import math", ""]
    i = 0
    while len(out) < lines:
        name = f"item_{seed}_{i}"
        out += [
            f"def compute_{name}(values, scale={i % 7 + 1}):",
            f'    """Return the scaled total of {name}."""',
            "    total = 0",
            "    for v in values:",
            f"        total += v * scale + {i}",
            "    return math.sqrt(abs(total))",
            "",
        ]
        i += 1
    return "\n".join(out[:lines])


def prompts(loaded: Any, workload: str, n: int, lines: int) -> list[list[int]]:
    out = []
    for k in range(n):
        if workload == "copy":
            text = (
                "Here is a file:\n```python\n"
                + source_file(lines, k)
                + f"\n```\nRewrite the whole file, renaming compute_item_{k}_0 to "
                "compute_first. Output only the file."
            )
        else:
            text = f"Write a long story about {TOPICS[k % len(TOPICS)]}."
        msgs = [{"role": "user", "content": text}]
        out.append(loaded.tokenizer.encode(loaded.template.render(msgs)))
    return out


def raw_mlx_lm(loaded: Any, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    times: list[float] = []
    out: list[int] = []
    for token, _ in generate_step(
        mx.array(prompt), loaded.model, max_tokens=tokens, sampler=lambda lp: mx.argmax(lp, -1)
    ):
        times.append(time.perf_counter())
        out.append(int(token))
    return (len(times) - 1) / (times[-1] - times[0]), out


def engine_run(
    loaded: Any, prompts_: list[list[int]], tokens: int, mode: str, draft_tokens: int
) -> dict[str, Any]:
    from mlx_server.engine.batch import BatchEngine
    from mlx_server.messages import Admit, GenerationRequest, SamplingParams, TokenOut

    engine = BatchEngine(
        loaded.model,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        vocab_size=int(loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size),
        prefill_chunk=2048,
        keep_caches=False,
        speculative=mode,
        draft_tokens=draft_tokens,
    )
    for i, p in enumerate(prompts_):
        engine.admit(
            Admit(
                request=GenerationRequest(
                    request_id=str(i),
                    prompt_ids=tuple(p),
                    sampling=SamplingParams(temperature=0.0),
                    max_tokens=tokens,
                    ignore_eos=True,
                )
            )
        )
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts_))}
    started = None
    counted = steps = drafted0 = accepted0 = steps0 = 0
    while engine.has_work:
        events = engine.step()
        steps += 1
        now = time.perf_counter()
        for ev in events:
            if isinstance(ev, TokenOut):
                out[ev.request_id].append(ev.token_id)
                if started is not None:
                    counted += 1
        if started is None and all(out.values()):
            started, drafted0, accepted0, steps0 = now, engine.drafted, engine.accepted, steps
    end = time.perf_counter()
    assert started is not None
    return {
        "tok_s": counted / (end - started),
        "drafted": engine.drafted - drafted0,
        "accepted": engine.accepted - accepted0,
        "tokens_per_pass": counted / max(1, steps - steps0) / len(prompts_),
        "tokens": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=None, help="model path or repo (default: bundled)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--lines", type=int, default=40)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--draft-tokens", type=int, default=6)
    ap.add_argument("--workloads", default="copy,chat")
    ap.add_argument("--json", default=None, help="append one JSON line per figure to FILE")
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_server.engine.model import load

    loaded = load(args.model)
    print(f"model {loaded.name} on {mx.default_device()}, {args.tokens} tokens")
    rows = []
    for workload in args.workloads.split(","):
        ps = prompts(loaded, workload, args.streams, args.lines)
        raw, raw_tokens = raw_mlx_lm(loaded, ps[0], args.tokens)
        line = {"workload": workload, "prompt_tokens": len(ps[0]), "raw_mlx_lm_tok_s": raw}
        print(f"\n{workload}: prompt {len(ps[0])} tokens; raw mlx-lm 1 stream {raw:.1f} tok/s")
        runs: dict[str, dict[str, Any]] = {}
        for n in sorted({1, args.streams}):
            runs = {
                m: engine_run(loaded, ps[:n], args.tokens, m, args.draft_tokens)
                for m in ("off", "auto")
            }
            same = sum(
                runs["off"]["tokens"][k] == runs["auto"]["tokens"][k] for k in runs["off"]["tokens"]
            )
            off, auto = runs["off"], runs["auto"]
            acc = auto["accepted"] / auto["drafted"] if auto["drafted"] else 0.0
            if n == 1:
                same_raw = raw_tokens == auto["tokens"]["0"]
            else:
                same_raw = None
            print(
                f"  {n} stream(s): off {off['tok_s']:.1f} tok/s, auto {auto['tok_s']:.1f} tok/s "
                f"({auto['tok_s'] / off['tok_s']:.2f}x off, {auto['tok_s'] / raw:.2f}x raw); "
                f"drafts {auto['accepted']}/{auto['drafted']} accepted ({acc:.0%}), "
                f"{auto['tokens_per_pass']:.2f} tokens/row/pass; identical {same}/{n}"
                + (f", equal to raw mlx-lm: {same_raw}" if same_raw is not None else "")
            )
            rows.append(
                {
                    **line,
                    "streams": n,
                    "off_tok_s": off["tok_s"],
                    "auto_tok_s": auto["tok_s"],
                    "drafted": auto["drafted"],
                    "accepted": auto["accepted"],
                    "identical": same,
                }
            )
        sample = loaded.tokenizer.decode(runs["auto"]["tokens"]["0"][:60])
        print(f"  first stream's output starts: {sample!r}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"device": str(mx.default_device()), **r}) + "\n")


if __name__ == "__main__":
    main()
