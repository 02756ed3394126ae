"""Estimate a model's memory before loading it, and refuse one that cannot fit, with a message
instead of the operating system killing the process half way through loading."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
HEADROOM = 1.15  # activations, KV cache for a first request, allocator slack


def safetensors_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ModelLoadError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read the safetensors header: {exc}") from exc
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= int(d)
        total += n * _DTYPE_BYTES.get(info["dtype"], 4)
    return total


def weights_bytes(model_dir: Path) -> int:
    return sum(safetensors_bytes(p) for p in sorted(model_dir.glob("*.safetensors")))


def available_bytes() -> int | None:
    """Memory the process may still use: MemAvailable on Linux, physical memory on macOS."""
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    if sys.platform == "darwin":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def check_fits(needed: int, where: str, *, available: int | None = None) -> None:
    avail = available_bytes() if available is None else available
    if avail is None:
        return
    if needed * HEADROOM > avail:
        raise ModelLoadError(
            f"{where}: the model needs about {needed * HEADROOM / 2**30:.1f} GiB "
            f"({needed / 2**30:.1f} GiB of weights) but only {avail / 2**30:.1f} GiB is available"
        )


# -- how many streams fit, how many prompt tokens per step ---------------------------------------

AUTO_BATCH_MIN = 8
AUTO_BATCH_MAX = 128
AUTO_CONTEXT_TOKENS = 4096  # the context each stream is assumed to fill, when sizing the batch
AUTO_MEMORY_SHARE = 0.6  # of the memory left after the weights and the prompt cache


def kv_bytes(config: dict[str, Any], dtype_bytes: int = 2) -> tuple[int, int]:
    """What one stream's cache costs, from the model's config: (bytes per token of context,
    fixed bytes). Full-attention layers grow by layers x kv_heads x head_dim x 2 (keys and
    values) x dtype bytes per token; a sliding-window layer stops growing at its window and a
    recurrent (linear-attention) layer holds a fixed state, so both count as fixed bytes.
    An estimate from the common config keys; unknown layouts count every layer as full."""
    cfg = {**config, **config.get("text_config", {})}
    layers = _int_of(cfg, "num_hidden_layers", "n_layer", "num_layers") or 1
    heads = _int_of(cfg, "num_attention_heads", "n_head") or 1
    kv_heads = _int_of(cfg, "num_key_value_heads", "n_kv_heads") or heads
    hidden = _int_of(cfg, "hidden_size", "n_embd", "d_model") or 0
    head_dim = _int_of(cfg, "head_dim") or (hidden // heads if hidden else 128)
    per_layer = 2 * kv_heads * head_dim * dtype_bytes
    kinds = _layer_kinds(cfg, layers)
    window = _int_of(cfg, "sliding_window") or 0
    full = sum(1 for k in kinds if k == "full")
    sliding = sum(1 for k in kinds if k == "sliding")
    linear = sum(1 for k in kinds if k == "linear")
    fixed = sliding * window * per_layer
    if linear:
        v_heads = _int_of(cfg, "linear_num_value_heads") or kv_heads
        k_dim = _int_of(cfg, "linear_key_head_dim") or head_dim
        v_dim = _int_of(cfg, "linear_value_head_dim") or head_dim
        conv = _int_of(cfg, "linear_conv_kernel_dim") or 4
        k_heads = _int_of(cfg, "linear_num_key_heads") or v_heads
        state = v_heads * k_dim * v_dim * 4  # the recurrent state is kept in float32
        conv_state = (conv - 1) * (2 * k_heads * k_dim + v_heads * v_dim) * dtype_bytes
        fixed += linear * (state + conv_state)
    return full * per_layer, fixed


def _int_of(cfg: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _layer_kinds(cfg: dict[str, Any], layers: int) -> list[str]:
    """Each layer's cache: "full" (grows), "sliding" (a window) or "linear" (a fixed state)."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        out = []
        for t in types:
            t = str(t)
            out.append("sliding" if "sliding" in t else "linear" if "linear" in t else "full")
        return out
    if isinstance(cfg.get("full_attention_interval"), int):  # qwen3-next style hybrids
        every = max(1, cfg["full_attention_interval"])
        return ["full" if (i + 1) % every == 0 else "linear" for i in range(layers)]
    pattern = _int_of(cfg, "sliding_window_pattern")
    if pattern and _int_of(cfg, "sliding_window"):  # gemma-style: every pattern-th is global
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers)]
    if _int_of(cfg, "sliding_window") and cfg.get("use_sliding_window", True) is not False:
        if cfg.get("model_type") in ("mistral", "mixtral"):
            return ["sliding"] * layers
    return ["full"] * layers


def auto_batch_size(
    config: dict[str, Any],
    free_bytes: int | None,
    *,
    dtype_bytes: int = 2,
    context_tokens: int = AUTO_CONTEXT_TOKENS,
    kv_bits: int = 0,
    kv_group_size: int = 64,
) -> int:
    """`--max-batch-size auto`: how many streams' caches fit in a share of the free memory,
    each stream assumed to fill `context_tokens` of context (or the model's own context, if
    shorter), clamped to [AUTO_BATCH_MIN, AUTO_BATCH_MAX]. A quantized KV cache (`kv_bits`)
    takes bits/8 bytes per value plus a 16-bit scale and bias per `kv_group_size` values."""
    if free_bytes is None:
        return 32
    cfg = {**config, **config.get("text_config", {})}
    context = min(context_tokens, _int_of(cfg, "max_position_embeddings") or context_tokens)
    per_token, fixed = kv_bytes(config, dtype_bytes)
    if kv_bits:
        per_value = kv_bits / 8 + 4 / kv_group_size
        per_token = int(per_token * per_value / dtype_bytes)
    per_stream = max(1, per_token * context + fixed)
    fits = int(free_bytes * AUTO_MEMORY_SHARE) // per_stream
    return max(AUTO_BATCH_MIN, min(AUTO_BATCH_MAX, fits))


def free_device_bytes(reserved: int = 0) -> int | None:
    """Memory left for caches now that the model is loaded, less `reserved` (the prompt cache):
    the GPU's working set minus what MLX holds, or the system's available memory on the CPU."""
    try:
        import mlx.core as mx

        if mx.default_device().type == mx.DeviceType.gpu:
            info = mx.device_info()
            total = int(info.get("max_recommended_working_set_size") or info.get("memory_size", 0))
            if total > 0:
                return max(0, total - mx.get_active_memory() - reserved)
    except Exception:  # an MLX without device_info: fall back to the system's figure
        pass
    avail = available_bytes()
    return None if avail is None else max(0, avail - reserved)


def activation_bytes(model: Any) -> int:
    """Bytes per element of the model's activations (and so of its KV cache): the dtype of its
    first floating-point parameter (a quantized layer's scales have it too)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(model.parameters()):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return value.dtype.size
    return 2


def prefill_budget() -> int:
    """`--prefill-chunk auto`: prompt tokens per step. A GPU reads 2048 tokens in about the
    time of a few decode passes (mlx-lm's own prefill step); a CPU takes longer per token, so
    a smaller budget keeps decoding rows moving while a long prompt is read."""
    try:
        import mlx.core as mx

        return 2048 if mx.default_device().type == mx.DeviceType.gpu else 512
    except Exception:
        return 512
