"""What constrained decoding (structured output) costs per decode step, batch of 4, with no
row, one row and every row constrained, greedy and at temperature 1, all in this process:

- sampling: `sample_batch` over (4, vocabulary) logits plus advancing each row's matcher, i.e.
  exactly what a constraint adds to a step (the forward pass is the same with or without);
- step: a whole `BatchEngine` decode step (forward pass included) on a tiny random llama, and
  with `--default` on the default model (slow on a CPU);
- the mask alone: llguidance's mask, and the mask plus `mx.where` on one row.

The cases take turns run by run (all six batches are kept alive side by side), so a noisy
shared host slows them all alike.

    uv run python -m bench.constrained                 # sampling + tiny model steps
    uv run python -m bench.constrained --default --steps 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlx_server.engine import constrain
from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import LoadedModel, load
from mlx_server.engine.sampling import RowSampler, sample_batch
from mlx_server.messages import Admit, ConstraintSpec, GenerationRequest, SamplingParams

# A realistic JSON shape that cannot close within the measured steps (at least 200 items).
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "n": {"type": "integer"},
                    "ok": {"type": "boolean"},
                },
                "required": ["name", "n", "ok"],
            },
        }
    },
    "required": ["items"],
}
SPEC = ConstraintSpec.json_schema(SCHEMA)
BATCH = 4


def engine_for(loaded: LoadedModel, constrained: int, temperature: float) -> BatchEngine:
    """A batch of BATCH rows, the first `constrained` of them constrained, past its prefill."""
    engine = BatchEngine(
        loaded.model,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        vocab_size=loaded.tokenizer.vocab_size,
        tokenizer=loaded.tokenizer,
        keep_caches=False,
    )
    prompt = tuple(
        loaded.tokenizer.encode(
            loaded.template.render([{"role": "user", "content": "List some items as JSON."}])
        )
    )
    for i in range(BATCH):
        request = GenerationRequest(
            request_id=f"r{i}",
            prompt_ids=prompt,
            sampling=SamplingParams(temperature=temperature, seed=i),
            max_tokens=100_000,
            ignore_eos=True,
            constraint=SPEC if i < constrained else None,
        )
        engine.admit(Admit(request=request))
    while engine.prefilling:
        engine.step()
    for _ in range(3):  # warm up
        engine.step()
    return engine


def mask_ms(loaded: LoadedModel, width: int, calls: int = 200) -> tuple[float, float]:
    """(llguidance's mask computation alone, mask + MLX masking of one row) in ms, median."""
    import mlx.core as mx

    tok = loaded.tokenizer
    c = constrain.start(SPEC, tok)
    for t in tok.encode('{"items":[{"name":"ab'):
        c.advance(t)
    row = mx.zeros((width,))
    only, full = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        c.allowed(width)
        only.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mx.eval(mx.where(mx.array(c.allowed(width)), row, -float("inf")))
        full.append(time.perf_counter() - t0)
    return statistics.median(only) * 1e3, statistics.median(full) * 1e3


def sampler_case(loaded: LoadedModel, constrained: int, temperature: float) -> Callable[[], float]:
    """One batch's sampling (mask, filter, draw, advance the matchers) on fixed random logits,
    as a function returning its seconds."""
    import mlx.core as mx

    width = loaded.config.get("vocab_size", loaded.tokenizer.vocab_size)
    logits = mx.random.normal((BATCH, width), key=mx.random.key(0)) * 4
    mx.eval(logits)

    def fresh(i: int) -> RowSampler:
        c = constrain.start(SPEC, loaded.tokenizer) if i < constrained else None
        return RowSampler(SamplingParams(temperature=temperature, seed=i), width, c)

    samplers = [fresh(i) for i in range(BATCH)]

    def once() -> float:
        t0 = time.perf_counter()
        tokens, _ = sample_batch(logits, samplers)
        mx.eval(tokens)
        for s, t in zip(samplers, tokens.tolist(), strict=True):  # type: ignore[arg-type]
            s.observe(t)
        elapsed = time.perf_counter() - t0
        samplers[:] = [fresh(i) if s.grammar_done else s for i, s in enumerate(samplers)]
        return elapsed

    return once


def engine_case(loaded: LoadedModel, constrained: int, temperature: float) -> Callable[[], float]:
    engine = engine_for(loaded, constrained, temperature)

    def once() -> float:
        t0 = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - t0
        assert len(engine.running) == BATCH, "a row finished: the comparison would be unfair"
        return elapsed

    return once


def table(
    title: str, unit: str, case: Callable[[int, float], Callable[[], float]], reps: int
) -> None:
    """Median of `reps` runs of each case; the cases take turns run by run, so a noisy host
    slows them all alike."""
    keys = [(c, t) for t in (0.0, 1.0) for c in (0, 1, BATCH)]
    runs = {key: case(*key) for key in keys}
    times: dict[tuple[int, float], list[float]] = {key: [] for key in keys}
    for _ in range(reps):
        for key in keys:
            times[key].append(runs[key]())
    print(f"  {title}")
    print(f"  {'rows constrained':>18} {'greedy ' + unit:>18} {'temp 1 ' + unit:>18}")
    for c in (0, 1, BATCH):
        greedy = statistics.median(times[c, 0.0]) * 1e3
        sampled = statistics.median(times[c, 1.0]) * 1e3
        print(f"  {f'{c} of {BATCH}':>18} {greedy:18.3f} {sampled:18.3f}")


def bench(name: str, loaded: LoadedModel, steps: int, *, sampling: bool) -> None:
    width = loaded.config.get("vocab_size", loaded.tokenizer.vocab_size)
    only, full = mask_ms(loaded, width)
    print(f"\n{name}: vocabulary {loaded.tokenizer.vocab_size}, logits {width}, batch {BATCH}")
    print(f"  mask alone {only:.3f} ms/row; mask + mx.where on one row {full:.3f} ms/row")
    if sampling:
        table(
            "sampling only (what a constraint adds to a step), ms",
            "ms",
            lambda c, t: sampler_case(loaded, c, t),
            200,
        )
    table(
        f"whole decode step, forward pass included ({steps} steps each)",
        "ms",
        lambda c, t: engine_case(loaded, c, t),
        steps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.constrained", description=__doc__)
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed per case")
    parser.add_argument("--default", action="store_true", help="also the default model's steps")
    args = parser.parse_args()
    from mlx_server.testing.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny-llama"
        build_tiny_model(path, "llama")
        bench("tiny random llama", load(str(path)), args.steps, sampling=True)
    if args.default:
        loaded = load(None)
        bench(f"default model ({loaded.name})", loaded, args.steps, sampling=False)


if __name__ == "__main__":
    main()
