"""Subprocess entry points for `bench.load`, each in a fresh interpreter so the BLAS choice is
made before MLX is first imported (a BLAS preloaded after `import mlx` changes nothing).

    python -m bench.workers raw --model DIR --variant shipped|fp32
        mlx-lm's own generation (`generate_step`), no HTTP: the ceiling. `shipped` loads the
        weights as stored with MLX's bundled BLAS; `fp32` preloads the system OpenBLAS and runs
        float32 weights, as our server does on the CPU. Requests and replies are JSON lines on
        stdin and stdout; a {"batch": [...]} line runs all its requests at once through
        mlx-lm's `BatchGenerator` (continuous batching, as mlx_lm.server batches).
    python -m bench.workers mlx-lm-server --blas openblas -- ARGS...
        `mlx_lm.server` with the system OpenBLAS preloaded (to serve float32 weights on the same
        footing as our server).
    python -m bench.workers fp32-dir SRC DST
        Write a float32 copy of an MLX model directory (dequantized); prints "same" when SRC is
        float32 already and nothing was written.

Nothing at module level imports MLX.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def _preload_openblas() -> str:
    from mlx_server.engine.cpu import preload_blas

    path = preload_blas({"MLX_SERVER_BLAS": "auto"})
    if path is None:
        raise SystemExit("no system OpenBLAS found (or MLX already imported)")
    return path


def raw(model_dir: str, variant: str) -> None:
    """Load the model and print a READY line with how it runs; then, for each JSON request
    line on stdin ({"messages", "max_tokens"}), run it through `generate_step` (greedy; EOS
    does not stop it) and print one JSON line with the time of every token as it is yielded
    (`time.perf_counter`). Serving requests one at a time lets the parent interleave systems,
    so that none is measured only while the shared machine happens to be busy."""
    blas = _preload_openblas() if variant == "fp32" else "MLX bundled"
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tokenizer = load(model_dir)
    weights = "as stored"
    if variant == "fp32":
        from mlx_server.engine.cpu import prepare_for_device

        weights = prepare_for_device(model, "always")

    def greedy(logprobs: mx.array) -> mx.array:
        return mx.argmax(logprobs, axis=-1)

    info = {"blas": blas, "weights": weights, "device": str(mx.default_device())}
    print("READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "batch" in request:
            print(json.dumps(_batch(model, tokenizer, request["batch"], greedy)), flush=True)
            continue
        ids = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True)
        arrivals: list[float] = []
        start = time.perf_counter()
        for _token, _ in generate_step(
            mx.array(ids), model, max_tokens=request["max_tokens"], sampler=greedy
        ):
            arrivals.append(time.perf_counter())
        reply = {"start": start, "arrivals": arrivals, "prompt_tokens": len(ids)}
        print(json.dumps(reply), flush=True)


def _batch(model: Any, tokenizer: Any, requests: list[dict[str, Any]], sampler: Any) -> dict:
    """Every request inserted at once into mlx-lm's BatchGenerator, no stop tokens (EOS
    ignored); the time of every token of every request as the generator yields it."""
    from mlx_lm.generate import BatchGenerator

    prompts = [
        tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True) for r in requests
    ]
    start = time.perf_counter()
    gen = BatchGenerator(
        model, sampler=sampler, completion_batch_size=max(len(prompts), 1), stop_tokens=None
    )
    try:
        uids = gen.insert(prompts, [r["max_tokens"] for r in requests])
        arrivals: dict[int, list[float]] = {uid: [] for uid in uids}
        pending = set(uids)
        while pending:
            responses = gen.next_generated()
            now = time.perf_counter()
            for resp in responses:
                arrivals[resp.uid].append(now)
                if resp.finish_reason is not None:
                    pending.discard(resp.uid)
    finally:
        gen.close()
    replies = [
        {"arrivals": arrivals[uid], "prompt_tokens": len(p)}
        for uid, p in zip(uids, prompts, strict=True)
    ]
    return {"start": start, "replies": replies}


def fp32_dir(src: Path, dst: Path) -> str:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from mlx_server.engine.cpu import prepare_for_device

    model, _ = load(str(src))
    params = tree_flatten(model.parameters())
    quantized = any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    )
    if not quantized and all(p.dtype == mx.float32 for _, p in params):  # type: ignore[union-attr]
        return "same"
    prepare_for_device(model, "always")
    dst.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})  # type: ignore[arg-type]
    config = json.loads((src / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return str(dst)


def mlx_lm_server(blas: str, argv: list[str]) -> None:
    if blas == "openblas":
        _preload_openblas()
    from mlx_lm.server import main as server_main

    sys.argv = ["mlx_lm.server", *argv]
    server_main()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_raw = sub.add_parser("raw")
    p_raw.add_argument("--model", required=True)
    p_raw.add_argument("--variant", choices=("shipped", "fp32"), required=True)
    p_fp32 = sub.add_parser("fp32-dir")
    p_fp32.add_argument("src", type=Path)
    p_fp32.add_argument("dst", type=Path)
    p_srv = sub.add_parser("mlx-lm-server")
    p_srv.add_argument("--blas", choices=("openblas", "bundled"), default="openblas")
    p_srv.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "raw":
        raw(args.model, args.variant)
    elif args.cmd == "fp32-dir":
        print(fp32_dir(args.src, args.dst), flush=True)
    else:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        mlx_lm_server(args.blas, rest)


if __name__ == "__main__":
    main()
