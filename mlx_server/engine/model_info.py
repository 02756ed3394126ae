"""What a loaded model tells clients and the sampler: its recommended sampling settings, the
tokens that end its turns, and the facts `/v1/models` reports (context length, capabilities,
quantization, size). Plain code over config files and GGUF metadata; no MLX.

Sampling defaults, in the order a request's missing field is filled:
request > server flag (`--temperature`, `--top-p`, `--top-k`, `--min-p`) > the model's
`generation_config.json` (or GGUF `general.sampling.*` metadata) > the API's own defaults.
`LoadedModel.sampling_defaults` holds the middle two, merged (flags win); only keys given.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# GGUF metadata written by llama.cpp's converter from generation_config.json.
_GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",  # llama.cpp's name
    "general.sampling.repeat_penalty": "repetition_penalty",
    "general.sampling.repetition_penalty": "repetition_penalty",
}
# The bundled default model (SmolLM2-135M-Instruct, 4-bit) ships no generation_config in its
# GGUF. At the API default (temperature 1) it answers "What is the capital of France?" with
# French-looking babble; at its model card's temperature 0.2 / top_p 0.9 still 2 answers in 8
# (its first token is "The" 55% of the time and "L" 36% at temperature 0.2); with top_p 0.5 the
# nucleus keeps only tokens that lead it, and 8 answers in 8 are "The capital of France is
# Paris." (samples in the README).
DEFAULT_MODEL_SAMPLING: dict[str, float] = {"temperature": 0.2, "top_p": 0.5}

# Markers that open or close a chat turn in common templates: when the template uses one, the
# model emitting it has ended its answer (SmolLM2 sometimes samples `<|im_start|>` without
# `<|im_end|>`, and would otherwise write the next turn itself).
TURN_MARKERS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<end_of_turn>",
    "<start_of_turn>",
    "<|end|>",
    "<|user|>",
    "<|endoftext|>",
    "<|return|>",
    "<|call|>",
    "<|observation|>",
    "<|im_user|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<\uff5cUser\uff5c>",
)
# gpt-oss's Harmony turn holds several messages (`<|end|><|start|>assistant...`): only
# `<|return|>` and `<|call|>` end it.
_HARMONY_INNER = ("<|end|>", "<|start|>")

# llama.cpp's `general.file_type` values.
_GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


@attrs.frozen(kw_only=True)
class Quantization:
    """How the weights are stored: MLX's affine (or other mode) quantization, or a GGUF type."""

    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None  # MLX quantization mode (affine, mxfp4, ...)
    gguf_type: str | None = None  # e.g. Q4_1, as llama.cpp names the file type
    mixed: bool = False  # per-layer bit widths differ

    @property
    def label(self) -> str:
        if self.gguf_type is not None:
            return self.gguf_type
        text = f"{self.bits}-bit" if self.bits else "quantized"
        if self.mixed:
            text = "mixed " + text
        if self.group_size:
            text += f", group size {self.group_size}"
        if self.mode and self.mode != "affine":
            text += f" ({self.mode})"
        return text


@attrs.frozen(kw_only=True)
class ModelInfo:
    """The facts `/v1/models` reports about a model."""

    model_type: str | None
    context_length: int | None
    tools: bool  # the template renders tools, or the generic tool prompt stands in
    tool_fallback: bool  # ... by the generic tool prompt (`engine.chat_template`)
    reasoning: bool  # the template has reasoning markup (<think>, Harmony channels)
    vision: bool = False
    quantization: Quantization | None = None
    size_bytes: int = 0  # the weight files on disk

    @property
    def capabilities(self) -> tuple[str, ...]:
        names = ["completion"]
        if self.tools:
            names.append("tools")
        if self.reasoning:
            names.append("reasoning")
        if self.vision:
            names.append("vision")
        return tuple(names)


# ------------------------------------------------------------------------------ sampling


def clean_sampling(values: Mapping[str, Any], where: str) -> dict[str, float]:
    """The usable sampling keys of `values` (numbers in range); others are logged and dropped."""
    out: dict[str, float] = {}
    for key in SAMPLING_KEYS:
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            log.warning("%s: ignoring %s=%r (not a number)", where, key, value)
            continue
        number = float(value)
        ok = (
            math.isfinite(number)
            and {
                "temperature": number >= 0,
                "top_p": 0 < number <= 1,
                "top_k": number >= 0 and number.is_integer(),
                "min_p": 0 <= number <= 1,
                "repetition_penalty": number > 0,
            }[key]
        )
        if not ok:
            log.warning("%s: ignoring %s=%r (out of range)", where, key, value)
            continue
        out[key] = int(number) if key == "top_k" else number
    return out


def generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); its settings are ignored", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def sampling_from_dir(model_dir: Path) -> dict[str, float]:
    return clean_sampling(generation_config(model_dir), str(model_dir / "generation_config.json"))


def sampling_from_gguf(values: Mapping[str, Any], where: str) -> dict[str, float]:
    found: dict[str, Any] = {}
    for k, key in _GGUF_SAMPLING.items():
        if k in values:
            found.setdefault(key, values[k])
    return clean_sampling(found, where)


# ------------------------------------------------------------------------------ turn ends


def end_of_turn_ids(tokenizer: Tokenizer, template: str | None) -> frozenset[int]:
    """Single-token turn markers the template uses (see `TURN_MARKERS`)."""
    source = template or ""
    harmony = "<|channel|>" in source
    ids: set[int] = set()
    for marker in TURN_MARKERS:
        if marker not in source or (harmony and marker in _HARMONY_INNER):
            continue
        tid = tokenizer.token_to_id(marker)
        if tid is not None:
            ids.add(tid)
    return frozenset(ids)


def harmony_inner_ids(tokenizer: Tokenizer) -> frozenset[int]:
    ids = (tokenizer.token_to_id(m) for m in _HARMONY_INNER)
    return frozenset(i for i in ids if i is not None)


# ------------------------------------------------------------------------------ metadata


def context_length(config: Mapping[str, Any]) -> int | None:
    """The longest context the model was built for, from its config (text_config too)."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, Mapping):
            continue
        for key in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions"):
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def mlx_quantization(config: Mapping[str, Any]) -> Quantization | None:
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    bits, group = q.get("bits"), q.get("group_size")
    widths = {v.get("bits") for v in q.values() if isinstance(v, Mapping)} - {None}
    mode = q.get("mode") if isinstance(q.get("mode"), str) else None
    return Quantization(
        bits=bits if isinstance(bits, int) else None,
        group_size=group if isinstance(group, int) else None,
        mode=mode,
        mixed=bool(widths - {bits}),
    )


def gguf_quantization(values: Mapping[str, Any]) -> Quantization | None:
    ftype = values.get("general.file_type")
    if not isinstance(ftype, int):
        return None
    name = _GGUF_FILE_TYPES.get(ftype, f"type {ftype}")
    if name in ("F32", "F16", "BF16"):
        return None
    return Quantization(gguf_type=name)


def files_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
