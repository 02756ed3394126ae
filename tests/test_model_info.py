"""Sampling defaults, turn-ending tokens and /v1/models metadata of a loaded model
(`engine.model_info`), and the server's sampling flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from mlx_server.config import load_settings
from mlx_server.engine import model_info
from mlx_server.engine.model import load
from mlx_server.engine.tokenizer import Tokenizer
from mlx_server.testing.tiny import alternating_bits, build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("info") / "tiny-qwen3"
    build_tiny_model(path, "qwen3")
    (path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.95,
                "top_k": 20,
                "min_p": "high",  # not a number: ignored
                "repetition_penalty": -1,  # out of range: ignored
                "eos_token_id": [2],
            }
        )
    )
    return path


def test_generation_config_gives_the_sampling_defaults_and_flags_win(tiny: Path) -> None:
    loaded = load(str(tiny))
    assert loaded.sampling_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert isinstance(loaded.sampling_defaults["top_k"], int)
    flagged = load(str(tiny), sampling_overrides={"temperature": 0.3, "min_p": 0.05})
    assert flagged.sampling_defaults == {
        "temperature": 0.3,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.05,
    }


def test_no_generation_config_means_no_defaults(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "m", "llama")
    assert load(str(tmp_path / "m")).sampling_defaults == {}


def test_gguf_sampling_metadata() -> None:
    meta = {
        "general.sampling.temp": 0.7,
        "general.sampling.top_k": 40,
        "general.sampling.penalty_repeat": 1.1,
        "general.name": "x",
    }
    assert model_info.sampling_from_gguf(meta, "f.gguf") == {
        "temperature": 0.7,
        "top_k": 40,
        "repetition_penalty": 1.1,
    }


def test_every_turn_marker_of_the_template_ends_generation(tiny: Path) -> None:
    loaded = load(str(tiny))
    tok = loaded.tokenizer
    # SmolLM2's template (the tiny models use it): <|im_start|> stops as well as <|im_end|>.
    assert {tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")} <= tok.eos_token_ids


def test_harmony_turns_end_only_at_return_and_call() -> None:
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "?": 1}, unk_token="?"))
    markers = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]
    backend.add_special_tokens(markers)
    tok = Tokenizer(backend=backend, eos_token_ids=frozenset())
    harmony = "{{ '<|start|>assistant<|channel|>final<|message|>' }}<|end|><|return|><|call|>"
    ids = model_info.end_of_turn_ids(tok, harmony)
    assert ids == {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")}
    chatml_like = "<|start|>user<|end|>"
    assert model_info.end_of_turn_ids(tok, chatml_like) == {tok.token_to_id("<|end|>")}


def test_metadata_for_v1_models(tiny: Path, tmp_path: Path) -> None:
    info = load(str(tiny)).info
    assert info is not None
    assert info.model_type == "qwen3" and info.context_length == 4096
    # SmolLM2's template ignores tools: the generic tool prompt stands in.
    assert info.tools and info.tool_fallback and not info.reasoning and not info.vision
    assert info.capabilities == ("completion", "tools")
    assert info.quantization is None
    assert info.size_bytes == (tiny / "model.safetensors").stat().st_size

    path = tmp_path / "q"
    build_tiny_model(path, "llama", bits=4, layer_bits=alternating_bits)
    quant = load(str(path)).info
    assert quant is not None and quant.quantization is not None
    assert (quant.quantization.bits, quant.quantization.group_size) == (4, 64)
    assert quant.quantization.mixed
    assert quant.quantization.label == "mixed 4-bit, group size 64"


@pytest.mark.slow
def test_default_model_metadata_and_sampling() -> None:
    loaded = load(None)
    assert loaded.sampling_defaults == {"temperature": 0.2, "top_p": 0.5}
    info = loaded.info
    assert info is not None and info.context_length == 8192
    assert info.quantization is not None and info.quantization.label == "Q4_1"
    assert info.size_bytes > 50_000_000
    tok = loaded.tokenizer
    assert tok.token_to_id("<|im_start|>") in tok.eos_token_ids


def test_sampling_flags() -> None:
    settings = load_settings(
        ["--temperature", "0.5", "--top-p", "0.8", "--top-k", "20", "--min-p", "0.05"], {}
    )
    assert settings.sampling_overrides == {
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.05,
    }
    assert load_settings([], {"MLX_SERVER_TEMPERATURE": "0"}).sampling_overrides == {
        "temperature": 0.0
    }
    assert load_settings([], {}).sampling_overrides == {}
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "x"], ["--min-p", "2"]):
        with pytest.raises(SystemExit):
            load_settings(bad, {})
