"""`mlx-server convert`: a GGUF becomes an MLX directory that mlx-lm loads as is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import generate_step

from mlx_server.engine.gguf import load_gguf
from mlx_server.engine.model import default_model_path


@pytest.mark.slow
def test_convert_default_model_matches_gguf(tmp_path: Path) -> None:
    out = tmp_path / "smol"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_server", "convert", str(default_model_path()), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8

    ref_model, ref_tok = mlx_lm.load(str(out))
    ours, our_tok, _ = load_gguf(default_model_path())
    prompt = ref_tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    assert prompt == our_tok.encode(
        ref_tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=False,
        )
    )
    logits_ref = ref_model(mx.array([prompt]))[0, -1]
    logits_ours = ours(mx.array([prompt]))[0, -1]
    assert mx.allclose(logits_ref, logits_ours, atol=1e-4).item()
    greedy = [
        int(t)
        for t, _ in generate_step(
            mx.array(prompt), ref_model, max_tokens=8, sampler=lambda lp: mx.argmax(lp, axis=-1)
        )
    ]
    assert "Paris" in ref_tok.decode(greedy)

    # A second run refuses to overwrite without --force.
    again = subprocess.run(
        [sys.executable, "-m", "mlx_server", "convert", str(default_model_path()), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
