"""What constrained decoding (structured output) costs per decode step: the batch engine's
step time for the same batch of 4 with no constraint, one constrained row, and every row
constrained, greedy and at temperature 1, all in this process on this machine. Also the cost of
the mask alone (llguidance's mask plus building the boolean row for MLX).

    uv run python -m bench.constrained                  # tiny random llama, then the default model
    uv run python -m bench.constrained --only tiny --steps 32 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mlx_server.engine import constrain
from mlx_server.engine.batch import BatchEngine
from mlx_server.engine.model import LoadedModel, load
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


def step_ms(loaded: LoadedModel, constrained: int, temperature: float, steps: int) -> float:
    """Median ms per decode step for BATCH rows, the first `constrained` of them constrained."""
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
        sampling = SamplingParams(temperature=temperature, seed=i)
        request = GenerationRequest(
            request_id=f"r{i}",
            prompt_ids=prompt,
            sampling=sampling,
            max_tokens=steps + 64,
            ignore_eos=True,
            constraint=SPEC if i < constrained else None,
        )
        engine.admit(Admit(request=request))
    while engine.prefilling:
        engine.step()
    for _ in range(3):  # warm up
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    assert len(engine.running) == BATCH, "a row finished early: the measure would be unfair"
    return statistics.median(times) * 1e3


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


def bench(name: str, loaded: LoadedModel, steps: int, rounds: int) -> None:
    width = loaded.config.get("vocab_size", loaded.tokenizer.vocab_size)
    only, full = mask_ms(loaded, width)
    print(f"\n{name}: vocabulary {loaded.tokenizer.vocab_size}, batch {BATCH}, {steps} steps")
    print(f"  mask alone {only:.3f} ms/row; mask + mx.where on one row {full:.3f} ms/row")
    # The cases take turns, round after round, so that a noisy host slows them all alike.
    cases = [(c, t) for c in (0, 1, BATCH) for t in (0.0, 1.0)]
    results: dict[tuple[int, float], list[float]] = {case: [] for case in cases}
    for _ in range(rounds):
        for constrained, temperature in cases:
            results[constrained, temperature].append(
                step_ms(loaded, constrained, temperature, steps)
            )
    print(f"  {'rows constrained':>18} {'greedy ms/step':>15} {'temp 1 ms/step':>15}")
    for constrained in (0, 1, BATCH):
        greedy = statistics.median(results[constrained, 0.0])
        sampled = statistics.median(results[constrained, 1.0])
        print(f"  {f'{constrained} of {BATCH}':>18} {greedy:15.2f} {sampled:15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per case (median taken)")
    parser.add_argument("--only", choices=["tiny", "default"], help="just one of the models")
    args = parser.parse_args()
    if args.only != "default":
        from mlx_server.testing.tiny import build_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tiny-llama"
            build_tiny_model(path, "llama")
            bench("tiny random llama", load(str(path)), args.steps, args.rounds)
    if args.only != "tiny":
        loaded = load(None)
        bench(f"default model ({loaded.name})", loaded, args.steps, args.rounds)


if __name__ == "__main__":
    main()
