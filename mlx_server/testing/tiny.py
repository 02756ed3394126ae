"""Tiny random-weight models built with mlx-lm's own classes and saved in the Hugging Face layout
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json), for tests and
benchmarks that need many fast generations. The tokenizer and chat template are the default
model's (SmolLM2), so prompts look like real chat prompts."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..engine.tokenizer import Tokenizer

TINY_ARGS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
}


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    from ..engine.gguf import load_gguf
    from ..engine.model import default_model_path

    _, tokenizer, _ = load_gguf(default_model_path())
    return tokenizer


def build_tiny_model(
    out_dir: Path, model_type: str = "llama", *, seed: int = 0, scale: float = 4.0, **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Create, save and return (model, config). Weights are random but scaled up so the
    next-token distribution is peaked (greedy choices are then far from ties)."""
    tokenizer = default_tokenizer()
    config: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": tokenizer.vocab_size,
        **TINY_ARGS[model_type],
        **overrides,
    }
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = module.Model(args)
    model.update(tree_map(lambda p: p * scale if p.ndim > 1 else p, model.parameters()))
    mx.eval(model.parameters())
    save_model_dir(out_dir, model, config, tokenizer)
    return model, config


def save_model_dir(
    out_dir: Path, model: nn.Module, config: dict[str, Any], tokenizer: Tokenizer
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "chat_template": tokenizer.chat_template,
                "add_bos_token": tokenizer.add_bos,
            },
            indent=2,
        )
    )
