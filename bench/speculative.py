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

With `--draft-model PATH` (a model with the same tokenizer) or `--draft-layers N` (the model's
own first N layers, sharing its weights: an early-exit draft, the only draft model one can
build offline for the default model), a third mode, "draft", has the draft model propose.
`--repeats` runs each mode that many times, interleaved, and reports the median.

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


def early_exit(model: Any, layers: int) -> Any:
    """The model's own first `layers` layers, final norm and head, as a model (its weights are
    shared with `model`, not copied)."""
    import copy

    draft = copy.copy(model)
    draft.model = copy.copy(model.model)
    draft.model.layers = model.model.layers[:layers]
    if hasattr(draft, "args"):
        draft.args = copy.copy(model.args)
        draft.args.num_hidden_layers = layers
    return draft


def damp(model: Any, after: int, factor: float) -> None:
    """Scale the output projections (o_proj, down_proj) of layers `after`.. by `factor`
    (a quantized layer's scales and biases; a dense one's weight)."""
    import mlx.core as mx

    for layer in model.model.layers[after:]:
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            names = ("scales", "biases") if "scales" in proj else ("weight",)
            proj.update({n: proj[n] * factor for n in names if n in proj})
    mx.eval(model.parameters())


def engine_run(
    loaded: Any,
    prompts_: list[list[int]],
    tokens: int,
    mode: str,
    draft_tokens: int,
    draft: Any = None,
) -> dict[str, Any]:
    from mlx_server.engine.batch import BatchEngine
    from mlx_server.engine.draft import Drafter
    from mlx_server.messages import Admit, GenerationRequest, SamplingParams, TokenOut

    vocab = int(loaded.config.get("vocab_size") or loaded.tokenizer.vocab_size)
    engine = BatchEngine(
        loaded.model,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        vocab_size=vocab,
        prefill_chunk=2048,
        keep_caches=False,
        speculative=mode,
        draft_tokens=draft_tokens,
        drafter=Drafter(draft, vocab) if mode == "draft" else None,
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
    ap.add_argument("--draft-model", default=None, help="a draft model (same tokenizer)")
    ap.add_argument("--draft-layers", type=int, default=0, help="early-exit draft of N layers")
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode (median reported)")
    ap.add_argument(
        "--damp-deep",
        type=float,
        default=1.0,
        help="scale the attention and MLP outputs of the layers after --draft-layers by F: "
        "a random-weight model whose early exit then agrees with it often (a stand-in for a "
        "real target/draft pair, which cannot be downloaded here)",
    )
    args = ap.parse_args()

    import mlx.core as mx

    from mlx_server.engine.model import load

    loaded = load(args.model)
    print(f"model {loaded.name} on {mx.default_device()}, {args.tokens} tokens")
    draft = None
    if args.draft_model:
        draft = load(args.draft_model).model
    elif args.draft_layers:
        if args.damp_deep != 1.0:
            damp(loaded.model, args.draft_layers, args.damp_deep)
        draft = early_exit(loaded.model, args.draft_layers)
    modes = ("off", "auto", "draft") if draft is not None else ("off", "auto")
    rows = []
    for workload in args.workloads.split(","):
        ps = prompts(loaded, workload, args.streams, args.lines)
        raw, raw_tokens = raw_mlx_lm(loaded, ps[0], args.tokens)
        line = {"workload": workload, "prompt_tokens": len(ps[0]), "raw_mlx_lm_tok_s": raw}
        print(f"\n{workload}: prompt {len(ps[0])} tokens; raw mlx-lm 1 stream {raw:.1f} tok/s")
        runs: dict[str, dict[str, Any]] = {}
        for n in sorted({1, args.streams}):
            trials: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for _ in range(args.repeats):
                for m in modes:
                    trials[m].append(
                        engine_run(loaded, ps[:n], args.tokens, m, args.draft_tokens, draft)
                    )
            runs = {m: sorted(t, key=lambda r: r["tok_s"])[len(t) // 2] for m, t in trials.items()}
            off = runs["off"]
            print(f"  {n} stream(s): off {off['tok_s']:.1f} tok/s")
            figure: dict[str, Any] = {**line, "streams": n, "off_tok_s": off["tok_s"]}
            for m in modes[1:]:
                run = runs[m]
                same = sum(off["tokens"][k] == run["tokens"][k] for k in off["tokens"])
                acc = run["accepted"] / run["drafted"] if run["drafted"] else 0.0
                same_raw = raw_tokens == run["tokens"]["0"] if n == 1 else None
                print(
                    f"    {m}: {run['tok_s']:.1f} tok/s ({run['tok_s'] / off['tok_s']:.2f}x off, "
                    f"{run['tok_s'] / raw:.2f}x raw); drafts {run['accepted']}/{run['drafted']} "
                    f"accepted ({acc:.0%}), {run['tokens_per_pass']:.2f} tokens/row/pass; "
                    f"identical {same}/{n}"
                    + (f", equal to raw mlx-lm: {same_raw}" if same_raw is not None else "")
                )
                figure |= {
                    f"{m}_tok_s": run["tok_s"],
                    f"{m}_drafted": run["drafted"],
                    f"{m}_accepted": run["accepted"],
                    f"{m}_identical": same,
                }
            figure["repeats"] = args.repeats
            rows.append(figure)
        sample = loaded.tokenizer.decode(runs["auto"]["tokens"]["0"][:60])
        print(f"  first stream's output starts: {sample!r}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({"device": str(mx.default_device()), **r}) + "\n")


if __name__ == "__main__":
    main()
