"""Load a llama.cpp GGUF file as an mlx_lm model plus our `Tokenizer`.

MLX reads GGUF itself (`mx.load`), and hands Q4_0/Q4_1/Q8_0 tensors back already in its own
affine-quantized layout (`weight`, `scales`, `biases`), so the model is built with quantized
layers and never dequantized. What MLX does not do is check the file: a truncated or corrupt
file can crash the process inside `mx.load`, so the header is walked in Python first and every
length and offset is checked against the file size.

Facts this code relies on (see docs/GGUF-NOTES.md): tensor names follow llama.cpp
(`blk.N.attn_q`), bit widths differ per tensor (the embedding of the default model is Q8_0,
the rest Q4_1), the output projection may be absent (tied embeddings), and llama.cpp permutes
the Q/K rows of llama models for its rotary layout, which is undone here.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from ..errors import ModelLoadError
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_TOKENIZERS", "load_gguf"]

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_TOKENIZERS = ("gpt2",)

# --------------------------------------------------------------------------------------------
# GGUF header validation
# --------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # gguflib (inside MLX) has room for 4 dimensions per tensor

# GGUF metadata value types -> byte size (for fixed-size scalars).
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_VALUE_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9

# GGML tensor types: id -> (name, elements per block, bytes per block).
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# Types that are plain numbers (no dequantization involved in loading them).
_PLAIN_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


@attrs.frozen
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGML order: dims[0] is the innermost (input) axis
    type_name: str


@attrs.frozen
class _Header:
    version: int
    values: dict[str, Any]  # scalar and string metadata only (arrays are skipped)
    tensors: dict[str, _TensorInfo]


class _Corrupt(Exception):
    """Raised inside the header walk; turned into ModelLoadError by the caller."""


class _Reader:
    """Bounds-checked little-endian reads from a memory map."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"{what} extends past the end of the file (truncated?)")

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip_string(self, what: str) -> None:
        n = self.u64(what)
        self.need(n, what)
        self.pos += n


def _read_header(path: Path) -> _Header:
    """Walk the whole GGUF header, checking every length against the file size, so that
    `mx.load` (whose C parser trusts the file) only ever sees structurally sound files."""
    size = path.stat().st_size
    if size < 24:
        raise _Corrupt(f"file is too small to be a GGUF file ({size} bytes)")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf, size)
        magic = buf[0:4]
        if magic != _GGUF_MAGIC:
            raise _Corrupt(f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
        r.pos = 4
        version = r.u32("version")
        if version not in (2, 3):
            if version.to_bytes(4, "little")[::-1] in (b"\0\0\0\2", b"\0\0\0\3"):
                raise _Corrupt("big-endian GGUF files are not supported")
            raise _Corrupt(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        # Each metadata entry takes at least 13 bytes and each tensor entry at least 28.
        if n_kv * 13 + n_tensors * 28 > size - r.pos:
            raise _Corrupt(f"implausible counts ({n_kv} metadata entries, {n_tensors} tensors)")

        values: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string("metadata key").decode("utf-8", "replace")
            vtype = r.u32(f"type of metadata {key!r}")
            if vtype in _VALUE_SIZES:
                values[key] = r.unpack(_VALUE_FORMATS[vtype], _VALUE_SIZES[vtype], key)
            elif vtype == _STRING:
                values[key] = r.string(key).decode("utf-8", "replace")
            elif vtype == _ARRAY:
                etype = r.u32(f"element type of {key!r}")
                count = r.u64(f"length of {key!r}")
                if etype in _VALUE_SIZES:
                    r.need(count * _VALUE_SIZES[etype], key)
                    r.pos += count * _VALUE_SIZES[etype]
                elif etype == _STRING:
                    r.need(count * 8, key)
                    for _ in range(count):
                        r.skip_string(key)
                else:
                    raise _Corrupt(f"metadata {key!r}: unsupported array element type {etype}")
            else:
                raise _Corrupt(f"metadata {key!r}: unknown value type {vtype}")

        tensors: dict[str, _TensorInfo] = {}
        placed: list[tuple[str, int, int]] = []
        for _ in range(n_tensors):
            name = r.string("tensor name").decode("utf-8", "replace")
            n_dims = r.u32(f"tensor {name!r} rank")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(r.u64(f"tensor {name!r} shape") for _ in range(n_dims))
            type_id = r.u32(f"tensor {name!r} type")
            offset = r.u64(f"tensor {name!r} offset")
            if type_id not in _GGML_TYPES:
                raise _Corrupt(f"tensor {name!r} has unknown GGML type {type_id}")
            type_name, block, block_bytes = _GGML_TYPES[type_id]
            if any(d == 0 or d >= 2**31 for d in dims) or dims[0] % block:
                raise _Corrupt(f"tensor {name!r} ({type_name}) has invalid shape {dims}")
            n_elements = 1
            for d in dims:
                n_elements *= d
            if name in tensors:
                raise _Corrupt(f"duplicate tensor {name!r}")
            tensors[name] = _TensorInfo(name, dims, type_name)
            placed.append((name, offset, n_elements // block * block_bytes))

        alignment = values.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"invalid general.alignment {alignment!r}")
        data_start = -(-r.pos // alignment) * alignment
        for name, offset, nbytes in placed:
            if data_start + offset + nbytes > size:
                raise _Corrupt(f"tensor {name!r} extends past the end of the file (truncated?)")
    return _Header(version=version, values=values, tensors=tensors)


# --------------------------------------------------------------------------------------------
# Metadata helpers
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """mx.load returns scalars and numeric arrays as mx.array; make them Python values.
    float32 scalars are rounded to float32 precision (1e-05, not 9.999999747378752e-06)."""
    if isinstance(value, mx.array):
        if value.ndim != 0:
            return value.tolist()
        item = value.item()
        return float(f"{item:.7g}") if isinstance(item, float) else item
    return value


def _get(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    return _plain(meta[key]) if key in meta else default


def _get_int(meta: dict[str, Any], key: str, default: int | None = None) -> int:
    value = _get(meta, key, default)
    if isinstance(value, list):  # per-layer values: accept only when uniform
        if not value or len(set(value)) != 1:
            raise ModelLoadError(f"GGUF metadata {key} varies per layer ({value}); not supported")
        value = value[0]
    if value is None:
        raise ModelLoadError(f"GGUF metadata is missing {key}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

# Pre-tokenizer regexes of the llama.cpp `tokenizer.ggml.pre` values we know.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build_tokenizer(meta: dict[str, Any], source: Path) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equivalent to llama.cpp's for this file."""
    kind = _get(meta, "tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ModelLoadError(
            f"{source}: unsupported GGUF tokenizer model {kind!r} "
            f"(supported: {', '.join(SUPPORTED_TOKENIZERS)} byte-level BPE)"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not isinstance(merges, list):
        raise ModelLoadError(f"{source}: GGUF tokenizer has no token list or no merges")
    token_types = _get(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        log.warning("%s: %d duplicate tokens in the vocabulary", source, len(tokens) - len(vocab))
    pairs: list[tuple[str, str]] = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{source}: malformed BPE merge {m!r}")
        pairs.append((a, b))

    pre = _get(meta, "tokenizer.ggml.pre", "default")
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, pairs, ignore_merges=pre == "llama-bpe", fuse_unk=False)
    )
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre == "llama-bpe":
        backend.pre_tokenizer = _split_then_bytes(_LLAMA3_REGEX)
    elif pre == "qwen2":
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = _split_then_bytes(_QWEN2_REGEX)
    else:
        if pre not in ("default", "gpt-2", "gpt2"):
            log.warning("%s: GGUF pre-tokenizer %r is not known here; using GPT-2's", source, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    added: list[tokenizers.AddedToken] = []
    for i, ttype in enumerate(token_types):
        if ttype in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED) and i < len(tokens):
            added.append(
                tokenizers.AddedToken(tokens[i], special=ttype == _TOKEN_CONTROL, normalized=False)
            )
    if added:
        backend.add_tokens(added)  # keeps the `special` flag of each AddedToken

    def token_at(key: str) -> tuple[int | None, str | None]:
        tid = _get(meta, key)
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            return tid, tokens[tid]
        return None, None

    _, bos_token = token_at("tokenizer.ggml.bos_token_id")
    _, eos_token = token_at("tokenizer.ggml.eos_token_id")
    chat_template = _get(meta, "tokenizer.chat_template")
    if not isinstance(chat_template, str):
        chat_template = None

    eos_ids: set[int] = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        tid, _ = token_at(key)
        if tid is not None:
            eos_ids.add(tid)
    for marker in _END_OF_TURN_MARKERS:
        mid = vocab.get(marker)
        if mid is not None and chat_template is not None and marker in chat_template:
            eos_ids.add(mid)
    if not eos_ids:
        log.warning("%s: GGUF declares no end-of-sequence token", source)

    return Tokenizer(
        backend=backend,
        eos_token_ids=frozenset(eos_ids),
        bos_token=bos_token,
        eos_token=eos_token,
        chat_template=chat_template,
        add_bos=bool(_get(meta, "tokenizer.ggml.add_bos_token", False)),
    )


# --------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------

_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_SUFFIXES = ("weight", "bias", "scales", "biases")


def _mlx_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`; None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in _SUFFIXES:
        return None
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def _build_config(arch: str, meta: dict[str, Any], header: _Header, source: Path) -> dict[str, Any]:
    """HF-style config from `{arch}.*` metadata, the shape llama/qwen2/qwen3 ModelArgs expect."""
    embd = header.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError(f"{source}: GGUF has no token_embd.weight tensor")
    hidden = _get_int(meta, f"{arch}.embedding_length")
    n_heads = _get_int(meta, f"{arch}.attention.head_count")
    head_dim = _get_int(meta, f"{arch}.attention.key_length", hidden // n_heads)
    rope_dim = _get_int(meta, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(
            f"{source}: partial rotary embedding ({rope_dim} of {head_dim} dims) is not supported"
        )
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": _get_int(meta, f"{arch}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _get_int(meta, f"{arch}.attention.head_count_kv", n_heads),
        "intermediate_size": _get_int(meta, f"{arch}.feed_forward_length"),
        "vocab_size": embd.dims[1],
        "rope_theta": float(_get(meta, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_get(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": _get_int(meta, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "head_dim": head_dim,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in header.tensors

    scaling = _get(meta, f"{arch}.rope.scaling.type")
    factor = _get(meta, f"{arch}.rope.scaling.factor")
    if scaling in ("linear", "yarn") and factor and float(factor) != 1.0:
        config["rope_scaling"] = {"rope_type": scaling, "type": scaling, "factor": float(factor)}
        orig = _get(meta, f"{arch}.rope.scaling.original_context_length")
        if scaling == "yarn" and orig:
            config["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    elif scaling not in (None, "none", "linear", "yarn"):
        log.warning("%s: rope scaling %r is not supported; ignored", source, scaling)
    return config


class _FreqFactorRoPE(nn.Module):
    """RoPE with llama.cpp's per-dimension frequency factors (`rope_freqs.weight`, written for
    Llama 3.1-style scaling instead of the HF rope_scaling parameters)."""

    def __init__(self, dims: int, base: float, factors: mx.array) -> None:
        super().__init__()
        self.dims = dims
        # MLX's `freqs` are periods: base**(2i/d); llama.cpp divides the angle by the factor.
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._freqs = periods * factors.astype(mx.float32)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )


def _unpermute(a: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's rotary row permutation of a Q or K tensor (weight, scales, biases or
    bias alike: quantization groups run along the input axis, so rows move as a whole)."""
    rows = a.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ModelLoadError(f"cannot undo Q/K permutation: {rows} rows for {n_heads} heads")
    hd = rows // n_heads
    return a.reshape(n_heads, hd // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _quant_params(name: str, info: _TensorInfo, weight: mx.array, scales: mx.array) -> dict:
    """Group size and bits of an MLX-quantized tensor, from its true and packed shapes."""
    in_features = info.dims[0]
    groups = scales.shape[-1]
    packed_bits = weight.shape[-1] * 32
    if groups == 0 or in_features % groups or packed_bits % in_features:
        raise ModelLoadError(f"tensor {name}: unexpected quantized shapes")
    return {"group_size": in_features // groups, "bits": packed_bits // in_features}


def _build_model(
    arch: str,
    config: dict[str, Any],
    arrays: dict[str, mx.array],
    header: _Header,
    source: Path,
) -> nn.Module:
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    try:
        args = module.ModelArgs.from_dict(config)
        model: nn.Module = module.Model(args)
    except Exception as exc:
        raise ModelLoadError(f"{source}: cannot build a {arch} model: {exc}") from exc

    weights: dict[str, mx.array] = {}
    quant: dict[str, dict[str, int]] = {}
    unknown: list[str] = []
    for gguf_name, value in arrays.items():
        name = _mlx_name(gguf_name)
        if name is None:
            if gguf_name != "rope_freqs.weight":
                unknown.append(gguf_name)
            continue
        if arch == "llama":
            stem = gguf_name.rpartition(".")[0]
            if stem.endswith(".attn_q"):
                value = _unpermute(value, config["num_attention_heads"])
            elif stem.endswith(".attn_k"):
                value = _unpermute(value, config["num_key_value_heads"])
        if value.ndim == 1 and mx.issubdtype(value.dtype, mx.floating):
            # Norm weights and biases: float32 keeps activations in float32, which on the
            # CPU is ~40x faster than float16 (and more accurate); they are tiny.
            value = value.astype(mx.float32)
        weights[name] = value
        if name.endswith(".scales"):
            stem = gguf_name.rpartition(".")[0]
            info = header.tensors[f"{stem}.weight"]
            path = name.rpartition(".")[0]
            quant[path] = _quant_params(gguf_name, info, arrays[f"{stem}.weight"], value)
    if unknown:
        log.warning("%s: ignoring %d unknown tensors: %s", source, len(unknown), unknown[:8])

    if quant:
        nn.quantize(
            model, class_predicate=lambda path, _m: dict(quant[path]) if path in quant else False
        )

    freq_factors = arrays.get("rope_freqs.weight")
    if freq_factors is not None:
        if freq_factors.shape != (config["head_dim"] // 2,):
            raise ModelLoadError(
                f"{source}: rope_freqs.weight has shape {tuple(freq_factors.shape)}, "
                f"expected ({config['head_dim'] // 2},)"
            )
        rope = _FreqFactorRoPE(config["head_dim"], config["rope_theta"], freq_factors)
        for layer in model.model.layers:  # type: ignore[attr-defined]
            layer.self_attn.rope = rope

    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: GGUF tensors do not fit the {arch} model: {exc}") from exc
    model.eval()
    mx.eval(model.parameters())

    config["quantization"] = _describe_quantization(quant)
    return model


def _describe_quantization(quant: dict[str, dict[str, int]]) -> dict[str, Any] | None:
    """mlx_lm-style quantization entry: the most common setting plus per-layer exceptions."""
    if not quant:
        return None
    common = Counter((q["group_size"], q["bits"]) for q in quant.values()).most_common(1)[0][0]
    desc: dict[str, Any] = {"group_size": common[0], "bits": common[1], "mode": "affine"}
    for path, q in sorted(quant.items()):
        if (q["group_size"], q["bits"]) != common:
            desc[path] = dict(q)
    return desc


def _warn_dequantized(header: _Header, arrays: dict[str, mx.array], source: Path) -> None:
    """MLX keeps only some GGUF quantizations; others come back as float16. Say so."""
    lost = Counter(
        info.type_name
        for name, info in header.tensors.items()
        if info.type_name not in _PLAIN_TYPES
        and f"{name.removesuffix('.weight')}.scales" not in arrays
    )
    if lost:
        detail = ", ".join(f"{n} x {t}" for t, n in sorted(lost.items()))
        log.warning(
            "%s: MLX cannot keep %s tensors quantized; they were dequantized to float16 "
            "(more memory, slower)",
            source,
            detail,
        )


def load_gguf(path: Path) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Returns (model, tokenizer, config).

    model is an mlx_lm model (llama, qwen2 or qwen3) with the GGUF's weights, quantized layers
    where the file is quantized, in eval mode, used like one from `mlx_lm.load`. config is the
    HF-style config dict, with a "quantization" entry (None when nothing is quantized).
    Raises ModelLoadError for a missing, corrupt or unsupported file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file")
    try:
        header = _read_header(path)
    except _Corrupt as exc:
        raise ModelLoadError(f"{path}: not a valid GGUF file: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc}") from exc

    # Cheap checks first, from the header walk, before MLX reads every tensor.
    arch = header.values.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    kind = header.values.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: unsupported GGUF tokenizer model {kind!r} "
            f"(supported: {', '.join(SUPPORTED_TOKENIZERS)} byte-level BPE)"
        )

    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # MLX raises RuntimeError/ValueError with a "[load_gguf]" message
        raise ModelLoadError(f"{path}: cannot read GGUF: {exc}") from exc
    assert isinstance(arrays, dict) and isinstance(meta, dict)

    _warn_dequantized(header, arrays, path)
    config = _build_config(arch, meta, header, path)
    tokenizer = _build_tokenizer(meta, path)
    model = _build_model(arch, config, arrays, header, path)
    return model, tokenizer, config
