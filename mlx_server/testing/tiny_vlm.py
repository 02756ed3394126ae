"""Tiny random-weight vision-language checkpoints built with mlx-vlm's own classes, for tests.

The layout is a real Hugging Face VLM checkpoint (config.json with a `vision_config`,
model.safetensors, tokenizer.json + tokenizer_config.json with a chat template that places image
parts, preprocessor_config.json, processor_config.json, video_preprocessor_config.json), written
entirely from local data so `mlx_vlm.load` never needs the hub. The tokenizer is built here too:
byte-level BPE over the 256 bytes (no merges) plus ChatML's and Qwen-VL's special tokens, so a
tiny VLM reads nothing but this repository (the default model's files stay unopened).

Families: Qwen2.5-VL (`qwen2_5_vl`, the most used small VLM family), Qwen2-VL (`qwen2_vl`) and
Qwen3-VL (`qwen3_vl`: nested text config, 16-pixel patches, deepstack features). Weights are
scaled up so greedy choices are far from ties; images are kept small by the processor's
`max_pixels` (at most 8 x 8 patches: 16 image tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'input_image') %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] in ('text', 'input_text') %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1e6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    # head_dim 16: 8 rotary frequencies split over (time, height, width).
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}

TINY_VLM_VISION: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        "model_type": "qwen2_5_vl",
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "in_channels": 3,
    },
    "qwen2_vl": {
        "model_type": "qwen2_vl",
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    },
    # Patches of 16 pixels, learned position embeddings on an 8x8 grid (interpolated to the
    # image's grid) and one "deepstack" layer whose features are added into the language
    # model's first layer at the image positions.
    "qwen3_vl": {
        "model_type": "qwen3_vl",
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
        "in_channels": 3,
    },
}

TINY_VLM_TYPES = (*TINY_VLM_VISION, "gemma3")

_PATCH = {"qwen2_5_vl": 14, "qwen2_vl": 14, "qwen3_vl": 16}
"""Pixels per patch side; the processor resizes images to multiples of 2 x this."""

_SCALE = {"gemma3": 0.5}
"""Weight scale per family (default 4): peaked enough for clear greedy choices, small enough
that the answer still depends on the image (Gemma 3 scales its embeddings by sqrt(hidden) and
saturates into one repeated token at 4)."""

_ARCHITECTURES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA_TOKENS = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
SPECIAL_TOKENS = (*CHAT_TOKENS, *VISION_TOKENS, *GEMMA_TOKENS)

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'input_image') %}{{ '<start_of_image>' }}"
    "{% elif part['type'] in ('text', 'input_text') %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def vision_tokenizer() -> HFTokenizer:
    """Byte-level BPE without merges (one token per byte, any text encodes) plus the chat and
    vision special tokens of both families after the 256 byte tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return backend


def build_tiny_vlm(
    out_dir: Path,
    model_type: str = "qwen2_5_vl",
    *,
    seed: int = 0,
    scale: float | None = None,
    max_pixels: int | None = None,
    sliding_window: int = 512,
) -> tuple[nn.Module, dict[str, Any]]:
    """Create, save and return (model, config) of a tiny VLM of `model_type`. Qwen images are
    resized to at most `max_pixels` (default 8 x 8 patches: 16 image tokens); Gemma 3 images
    are always 28 x 28 pixels, 4 image tokens; `sliding_window` is the window of Gemma 3's
    local-attention layers (a small one makes short prompts rotate their caches)."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    tokenizer = vision_tokenizer()
    tid = tokenizer.token_to_id
    text = {**_TEXT, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True)}
    if model_type == "gemma3":
        config = _gemma3_config(tokenizer, text, sliding_window)
    else:
        config = {
            "model_type": model_type,
            "architectures": [_ARCHITECTURES[model_type]],
            "vision_start_token_id": tid("<|vision_start|>"),
            "vision_end_token_id": tid("<|vision_end|>"),
            "image_token_id": tid("<|image_pad|>"),
            "video_token_id": tid("<|video_pad|>"),
            "eos_token_id": tid("<|im_end|>"),
            "bos_token_id": tid("<|im_start|>"),
            "vision_config": dict(TINY_VLM_VISION[model_type]),
        }
        if model_type == "qwen3_vl":
            # Qwen3-VL checkpoints nest the language model's settings; q/k norms, explicit
            # head_dim and interleaved multimodal RoPE sections.
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
            config["text_config"] = {
                **text,
                "model_type": "qwen3_vl_text",
                "head_dim": 16,
                "rope_scaling": rope,
            }
            config["tie_word_embeddings"] = True
        else:
            config.update(text)
    arch, _ = get_model_and_args(config)
    spec = json.loads(json.dumps(config))  # from_dict and friends modify what they are given
    model_config = update_module_configs(
        arch.ModelConfig.from_dict(spec), arch, spec, ["text", "vision"]
    )
    mx.random.seed(seed)
    model = arch.Model(model_config)
    factor = _SCALE.get(model_type, 4.0) if scale is None else scale
    model.update(tree_map(lambda p: p * factor if p.ndim > 1 else p, model.parameters()))
    mx.eval(model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(out_dir / "config.json", config)
    if model_type == "gemma3":
        _write_gemma3_processor(out_dir, tokenizer)
    else:
        unit = 2 * _PATCH[model_type]
        _write_qwen_processor(
            out_dir,
            tokenizer,
            patch_size=_PATCH[model_type],
            min_pixels=(2 * unit) ** 2,
            max_pixels=max_pixels or (4 * unit) ** 2,
        )
    return model, config


def _gemma3_config(
    tokenizer: HFTokenizer, text: dict[str, Any], sliding_window: int
) -> dict[str, Any]:
    """Gemma 3: a SigLIP encoder over 28 x 28 images (2 x 2 patches), its output pooled to
    `mm_tokens_per_image` soft tokens; a language model alternating sliding-window and global
    attention layers (plain RoPE: positions are cache offsets)."""
    tid = tokenizer.token_to_id
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "image_token_index": tid("<image_soft_token>"),
        "boi_token_index": tid("<start_of_image>"),
        "eoi_token_index": tid("<end_of_image>"),
        "mm_tokens_per_image": 4,
        "hidden_size": text["hidden_size"],
        "pad_token_id": tid("<pad>"),
        "bos_token_id": tid("<bos>"),
        "eos_token_id": [tid("<eos>"), tid("<end_of_turn>")],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": text["hidden_size"],
            "num_hidden_layers": 2,
            "intermediate_size": text["intermediate_size"],
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "vocab_size": text["vocab_size"],
            "sliding_window": sliding_window,
            "sliding_window_pattern": 2,
            "rope_global_base_freq": 1e6,
            "rope_local_base_freq": 1e4,
            "mm_tokens_per_image": 4,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": 28,
        },
    }


def _added_tokens(tokenizer: HFTokenizer) -> dict[str, Any]:
    return {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }


def _write_qwen_processor(
    out_dir: Path,
    tokenizer: HFTokenizer,
    *,
    patch_size: int,
    min_pixels: int,
    max_pixels: int,
) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "added_tokens_decoder": _added_tokens(tokenizer),
            "model_max_length": 4096,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
    }
    _write_json(out_dir / "preprocessor_config.json", image)
    _write_json(out_dir / "video_preprocessor_config.json", image)
    _write_json(out_dir / "processor_config.json", {"chat_template": CHAT_TEMPLATE})
    _write_json(
        out_dir / "generation_config.json", {"eos_token_id": tokenizer.token_to_id("<|im_end|>")}
    )


def _write_gemma3_processor(out_dir: Path, tokenizer: HFTokenizer) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": None,
            "add_bos_token": False,
            "added_tokens_decoder": _added_tokens(tokenizer),
            "extra_special_tokens": {
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
            "model_max_length": 4096,
            "chat_template": GEMMA_CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "Gemma3ImageProcessor",
            "processor_class": "Gemma3Processor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pan_and_scan": False,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": 28, "width": 28},
        },
    )
    _write_json(
        out_dir / "processor_config.json",
        {"image_seq_length": 4, "processor_class": "Gemma3Processor"},
    )
    _write_json(
        out_dir / "generation_config.json",
        {"eos_token_id": [tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<end_of_turn>")]},
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))
