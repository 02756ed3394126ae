"""The CPU fast path: an optimized BLAS loaded before MLX, and float32 weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from mlx_server.engine import cpu
from mlx_server.testing.tiny import build_tiny_model

SYSTEM_OPENBLAS = any(Path(p).exists() for p in cpu._CANDIDATES)


def run_py(code: str, **env: str) -> str:
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.slow  # starts a process
def test_preload_before_mlx_import() -> None:
    code = "from mlx_server.engine.cpu import preload_blas; print(preload_blas())"
    found = run_py(code)
    if SYSTEM_OPENBLAS:
        assert "openblas" in found
    else:
        assert found == "None"
    assert run_py(code, MLX_SERVER_BLAS="off") == "None"


@pytest.mark.slow  # starts a process
def test_too_late_after_mlx_import() -> None:
    code = "import mlx.core; from mlx_server.engine.cpu import preload_blas; print(preload_blas())"
    assert run_py(code) == "None"


def test_dequantize_to_float32_keeps_the_model(tmp_path: Path) -> None:
    model, config = build_tiny_model(tmp_path / "m")
    model, _ = quantize_model(model, config, group_size=32, bits=4)
    ids = mx.array([[1, 2, 3, 4, 5, 6]])
    before = model(ids)
    note = cpu.prepare_for_device(model, "always")
    assert "float32" in note
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    after = model(ids)
    assert mx.allclose(before, after, atol=1e-3).item()
    assert (mx.argmax(before, -1) == mx.argmax(after, -1)).all().item()


def test_never_and_auto_without_blas_leave_weights(tmp_path: Path) -> None:
    model, config = build_tiny_model(tmp_path / "m")
    model, _ = quantize_model(model, config, group_size=32, bits=4)
    assert cpu.prepare_for_device(model, "never") == "weights as stored"
    # In this test process no BLAS was preloaded (mlx was imported first), so auto keeps them.
    assert cpu.blas_loaded() is None
    assert cpu.prepare_for_device(model, "auto") == "weights as stored"
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
