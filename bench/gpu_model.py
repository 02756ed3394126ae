"""Build a real-sized llama with random quantized weights, for benchmarks on a machine that
cannot download the model (the GPU box): the shape of a real checkpoint, its cost per token, and
the real tokenizer (copied from a directory holding tokenizer.json and tokenizer_config.json).

    python -m bench.gpu_model OUT_DIR --tokenizer DIR [--shape 135m|1b|8b] [--bits 4] [--dtype bf16]
    python -m bench.gpu_model --export-tokenizer DIR   # write the default model's tokenizer files

Greedy text from random weights is gibberish; the benchmark only needs the token counts, and it
suppresses end-of-sequence itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct's config.json.
    "135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    # Llama-3.2-1B's dimensions (with SmolLM2's 49,152-token vocabulary).
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    # Llama-3.1-8B's dimensions (with SmolLM2's vocabulary).
    "8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def export_tokenizer(out: Path) -> None:
    """The default model's tokenizer files, as `mlx_server.testing.tiny` writes them."""
    import tempfile

    from mlx_server.testing.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(Path(tmp), "llama")
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tmp) / name, out / name)


def build(out: Path, tokenizer_dir: Path, shape: str, bits: int, dtype: str, seed: int) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config: dict[str, Any] = {"model_type": "llama", "vocab_size": vocab, **SHAPES[shape]}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(getattr(mx, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]))
    config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    if bits:
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})  # type: ignore[arg-type]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    nbytes = sum(v.nbytes for v in weights.values())
    return f"{shape} llama, {bits or dtype}-bit weights, {nbytes / 2**20:.0f} MiB -> {out}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_model", description=__doc__)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--tokenizer", type=Path, help="directory with the tokenizer files")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    parser.add_argument("--bits", type=int, default=4, help="0: not quantized")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-tokenizer", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        return
    if args.out is None or args.tokenizer is None:
        parser.error("OUT_DIR and --tokenizer are required")
    print(build(args.out, args.tokenizer, args.shape, args.bits, args.dtype, args.seed))


if __name__ == "__main__":
    sys.exit(main())
