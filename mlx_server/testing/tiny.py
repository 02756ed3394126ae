"""Tiny random-weight models built with mlx-lm's own classes and saved in the Hugging Face layout
(config.json, model.safetensors or sharded model-0000k-of-0000n.safetensors with
model.safetensors.index.json, tokenizer.json, tokenizer_config.json), for tests and benchmarks
that need many fast generations. The tokenizer and chat template are the default model's
(SmolLM2), so prompts look like real chat prompts.

One config per architecture family the tests cover (`TINY_ARGS`: one of each cache type mlx-lm
uses, plain KV, sliding window, recurrent state, chunked attention, and the common MoE and
attention variants; the server itself runs any architecture mlx-lm has); each can also be written in
bfloat16/float16, quantized (uniformly or with per-layer bit widths recorded in config.json's
`quantization` dict, as mlx-lm's converter writes them) and sharded."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ..engine.tokenizer import Tokenizer

_LLAMA: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}

TINY_ARGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    # mlx-lm runs mistral with its llama classes; untied output head and an explicit head_dim,
    # as Mistral checkpoints have.
    "mistral": {**_LLAMA, "tie_word_embeddings": False, "head_dim": 16, "rope_theta": 1e6},
    # Biases on q/k/v projections.
    "qwen2": {**_LLAMA, "rope_theta": 1e6},
    # q/k RMS norms and an explicit head_dim.
    "qwen3": {**_LLAMA, "head_dim": 16, "rope_theta": 1e6, "tie_word_embeddings": False},
    # Hybrid: layers 0 and 2 are gated-delta linear attention (recurrent state caches), 1 and 3
    # full attention (KV caches); every layer's MLP a mixture of 4 small experts (top 2) plus a
    # shared expert.
    "qwen3_next": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "full_attention_interval": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "partial_rotary_factor": 0.25,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # Mixture of 4 experts (top 2) in every layer.
    "mixtral": {**_LLAMA, "num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1e6},
    "qwen3_moe": {
        **_LLAMA,
        "head_dim": 16,
        "rope_theta": 1e6,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
    # Qwen3.5: hybrid like qwen3_next (gated-delta layers 0 and 2), dense MLPs, multimodal
    # rope parameters on the text model.
    "qwen3_5": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "full_attention_interval": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "type": "default",
            "rope_theta": 1e6,
            "partial_rotary_factor": 0.25,
        },
    },
    # Sliding-window attention (rotating KV caches, a window of 16 so that prompts overflow
    # it) in 2 layers of every 3, global attention in the third.
    "gemma3_text": {
        **_LLAMA,
        "num_hidden_layers": 3,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "sliding_window_pattern": 3,
        "rope_local_base_freq": 10000.0,
        "rms_norm_eps": 1e-6,
    },
    # Alternating sliding (window 16) and full attention, 4 experts (top 2), attention sinks.
    "gpt_oss": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 16,
        "rope_theta": 150000,
        "layer_types": ["sliding_attention", "full_attention"],
        "rms_norm_eps": 1e-5,
    },
    # Dense first layer, then routed experts (sigmoid scoring, groups) with a shared expert.
    "glm4_moe": {
        **_LLAMA,
        "head_dim": 16,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "routed_scaling_factor": 1.0,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "rope_scaling": None,
        "use_qk_norm": True,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
        "tie_word_embeddings": False,
    },
    "phi3": {**_LLAMA, "tie_word_embeddings": False},
    # Multi-head latent attention (low-rank q and kv), dense first layer then experts.
    "deepseek_v3": {
        **_LLAMA,
        "num_key_value_heads": 4,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "first_k_dense_replace": 1,
        "tie_word_embeddings": False,
    },
    "olmo2": {**_LLAMA, "tie_word_embeddings": False},
    "granite": {
        **_LLAMA,
        "logits_scaling": 0.5,
        "attention_multiplier": 0.2,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.7,
        "attention_bias": False,
        "mlp_bias": False,
    },
    # Chunked attention (mlx-lm's ChunkedKVCache, chunks of 16) in 3 layers of 4, global in
    # the fourth; experts in every other layer. Its caches do not batch.
    "llama4": {
        "text_config": {
            "model_type": "llama4_text",
            "attention_bias": False,
            "attention_chunk_size": 16,
            "head_dim": 16,
            "hidden_size": 64,
            "interleave_moe_layer_step": 2,
            "intermediate_size": 64,
            "intermediate_size_mlp": 128,
            "max_position_embeddings": 4096,
            "num_attention_heads": 4,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "rms_norm_eps": 1e-5,
            "rope_scaling": None,
            "rope_theta": 500000.0,
            "use_qk_norm": True,
        },
    },
    # Hybrid: short gated convolutions (conv state caches) and 2 attention layers.
    "lfm2": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_ff_dim": 128,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "tie_word_embeddings": True,
    },
}

LayerBits = Callable[[str], int | None]
"""Bit width for one quantizable layer, by its path (`model.layers.1.mlp.up_proj`); None means
the default `bits`."""


def alternating_bits(path: str) -> int | None:
    """A per-layer quantization as mixed as real ones: embeddings, output head and even layers
    8-bit, odd layers 4-bit."""
    m = re.match(r"model\.layers\.(\d+)\.", path)
    if m is None:
        return 8
    return 8 if int(m.group(1)) % 2 == 0 else 4


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    from ..engine.gguf import load_gguf
    from ..engine.model import default_model_path

    _, tokenizer, _ = load_gguf(default_model_path())
    return tokenizer


def build_tiny_model(
    out_dir: Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    scale: float = 4.0,
    dtype: mx.Dtype | None = None,
    bits: int | None = None,
    layer_bits: LayerBits | None = None,
    group_size: int = 64,
    shards: int = 1,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Create, save and return (model, config). Weights are random but scaled up so the
    next-token distribution is peaked (greedy choices are then far from ties).

    `dtype` casts the weights (e.g. `mx.bfloat16`); `bits` quantizes every quantizable layer,
    with `layer_bits` overriding it per layer (recorded per layer in config.json); `shards` > 1
    splits the weights over that many files with an index."""
    from mlx_lm.utils import _get_classes  # resolves mistral to its llama classes

    tokenizer = default_tokenizer()
    config: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": tokenizer.vocab_size,
        # Some architectures' Hugging Face configs default to another vocabulary's EOS id.
        "eos_token_id": min(tokenizer.eos_token_ids),
        **TINY_ARGS[model_type],
        **overrides,
    }
    if isinstance(config.get("text_config"), dict):  # multimodal layout: the text model's own
        config["text_config"] = {"vocab_size": config["vocab_size"], **config["text_config"]}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map(lambda p: p * scale if p.ndim > 1 else p, model.parameters()))
    if dtype is not None:
        model.set_dtype(dtype)
        config["torch_dtype"] = str(dtype).removeprefix("mlx.core.")
    if bits is not None or layer_bits is not None:
        model, config = _quantize(model, config, bits or 4, layer_bits, group_size)
    mx.eval(model.parameters())
    save_model_dir(out_dir, model, config, tokenizer, shards=shards)
    return model, config


def _quantize(
    model: nn.Module,
    config: dict[str, Any],
    bits: int,
    layer_bits: LayerBits | None,
    group_size: int,
) -> tuple[nn.Module, dict[str, Any]]:
    from mlx_lm.utils import quantize_model

    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if own is not None and isinstance(chosen := own(path, module), dict):
            return chosen  # the architecture's own fixed choices (qwen3_next's router gates)
        width = layer_bits(path) if layer_bits is not None else None
        if width is None or width == bits:
            return True
        return {"group_size": group_size, "bits": width, "mode": "affine"}

    with contextlib.redirect_stdout(io.StringIO()):  # it prints bits per weight
        return quantize_model(
            model, config, group_size=group_size, bits=bits, quant_predicate=predicate
        )


def save_model_dir(
    out_dir: Path,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    *,
    shards: int = 1,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    _save_weights(out_dir, weights, shards)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "chat_template": tokenizer.chat_template,
                "add_bos_token": tokenizer.add_bos,
                # Not the architecture's own tokenizer class (Gemma's would want `<unk>`).
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )


def _save_weights(out_dir: Path, weights: dict[str, mx.array], shards: int) -> None:
    if shards <= 1:
        mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    # Split by bytes, as Hugging Face and mlx-lm do, but into exactly `shards` files.
    names = sorted(weights)
    total = sum(weights[n].nbytes for n in names)
    parts: list[dict[str, mx.array]] = [{} for _ in range(shards)]
    seen = 0
    for name in names:
        part = min(shards - 1, seen * shards // max(total, 1))
        parts[part][name] = weights[name]
        seen += weights[name].nbytes
    parts = [p for p in parts if p]
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts, start=1):
        file = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        mx.save_safetensors(str(out_dir / file), part, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
