"""`mlx-server convert FILE.gguf OUT_DIR`: write an MLX model directory from a GGUF file.

Quantized tensors stay quantized (same bits and group sizes, recorded per layer in config.json),
Q/K rows are already in Hugging Face order after loading, and the tokenizer and chat template
come from the GGUF metadata, so mlx-lm (and mlx_lm.server) can load the result directly."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import MlxServerError


def convert(gguf_path: Path, out_dir: Path, *, force: bool = False) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .engine.gguf import load_gguf

    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise MlxServerError(f"{out_dir} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out_dir)
    model, tokenizer, config = load_gguf(gguf_path)
    if any(type(m).__name__ == "_FreqFactorRoPE" for _, m in model.named_modules()):
        # Its per-dimension RoPE factors are not parameters and mlx-lm's config cannot name them.
        raise MlxServerError(
            f"{gguf_path}: GGUF files with rope_freqs (Llama 3.1 style rope scaling) "
            "cannot be converted yet; serve the GGUF directly instead"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(config)
    if config.get("quantization") is None:
        config.pop("quantization", None)
    else:
        config["quantization_config"] = config["quantization"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    eos = sorted(tokenizer.eos_token_ids)
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
    return out_dir


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mlx-server convert", description="Write an MLX model directory from a GGUF file."
    )
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("out_dir", type=Path, help="the directory to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(list(argv))
    try:
        out = convert(args.gguf, args.out_dir, force=args.force)
    except MlxServerError as exc:
        print(f"mlx-server convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
