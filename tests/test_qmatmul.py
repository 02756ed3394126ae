"""Dense matmuls for quantized layers at row counts MLX's kernel is slow for
(`engine.qmatmul`, `--dense-matmul`).

On this CPU the switch is never made (`wanted`), so these tests drive it directly: a layer
switched to the dense way gives the kernel's output for the row counts it covers and uses the
kernel for the others; calibration times every step of the ladder and reports it; a whole
model switched over generates the same greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_server.config import load_settings
from mlx_server.engine import qmatmul
from mlx_server.testing.tiny import build_tiny_model


def quantized_layer() -> nn.QuantizedLinear:
    mx.random.seed(1)
    dense = nn.Linear(128, 96, bias=True)
    return nn.QuantizedLinear.from_linear(dense, group_size=64, bits=4)


def test_dense_rows_match_the_kernel_and_other_rows_use_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer = quantized_layer()
    inputs = {rows: mx.random.normal((rows, 128)) for rows in (1, 3, 8, 100)}
    want = {rows: layer(x) for rows, x in inputs.items()}
    layer.__class__ = qmatmul.RowsQuantizedLinear
    layer.dense = frozenset({8})  # type: ignore[attr-defined]
    calls: list[int] = []
    dequantize = mx.dequantize

    def spy(*args: Any, **kwargs: Any) -> mx.array:
        calls.append(1)
        return dequantize(*args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", spy)
    for rows, x in inputs.items():
        calls.clear()
        got = layer(x)
        assert bool(mx.allclose(got, want[rows], atol=1e-4)), rows
        # 3 rows are timed as the ladder's 8; 1 and 100 rows keep the kernel.
        assert bool(calls) == (rows in (3, 8)), rows


def test_buckets() -> None:
    assert qmatmul.LADDER == (2, 8, 32, 128, 512, 2048)
    got = [qmatmul._bucket(n) for n in (1, 2, 3, 8, 9, 100, 2048, 9000)]
    assert got == [1, 2, 8, 8, 32, 128, 2048, 2048]


def test_calibration_times_the_ladder_and_restores_the_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmatmul, "LADDER", (2, 8, 32, 128))
    model, _ = build_tiny_model(tmp_path / "q", "llama", bits=4)
    dense, note = qmatmul.calibrate(model)
    assert dense <= set(qmatmul.LADDER)
    if dense:  # a run of wins up to the top of the ladder
        assert max(dense) == qmatmul.LADDER[-1]
        assert dense == {n for n in qmatmul.LADDER if n >= min(dense)}
    for rows in qmatmul.LADDER:
        assert f" {rows}:" in f" {note.split(': ', 1)[1]}"
    # The layers are plain quantized layers again.
    assert all(type(m) is nn.QuantizedLinear for m in qmatmul._layers(model))
    assert len(qmatmul._layers(model)) == 14
    assert qmatmul.calibrate(nn.Linear(4, 4)) == (frozenset(), "")


def test_a_switched_model_generates_the_same_tokens(tmp_path: Path) -> None:
    from mlx_lm.generate import generate_step

    model, _ = build_tiny_model(tmp_path / "q", "llama", bits=4)
    prompt = mx.array(list(range(3, 40)))

    def greedy() -> list[int]:
        steps = generate_step(prompt, model, max_tokens=12, sampler=lambda x: mx.argmax(x, -1))
        return [int(t) for t, _ in steps]

    want = greedy()
    for layer in qmatmul._layers(model):
        layer.__class__ = qmatmul.RowsQuantizedLinear
        layer.dense = frozenset(qmatmul.LADDER)  # type: ignore[attr-defined]
    assert greedy() == want


def test_auto_is_off_on_a_cpu_and_the_flag_parses() -> None:
    if mx.default_device() == mx.cpu:
        assert not qmatmul.wanted("auto") and not qmatmul.wanted("on")
        model = nn.Sequential(quantized_layer())
        assert qmatmul.install(model, "on") == ""
    assert not qmatmul.wanted("off")
    assert load_settings([], {}).dense_matmul == "auto"
    assert load_settings(["--dense-matmul", "off"], {}).dense_matmul == "off"
    with pytest.raises(SystemExit):
        load_settings(["--dense-matmul", "sometimes"], {})
