"""Quantized matmuls of several rows, where MLX's kernel for them is slow.

A decode pass of one row multiplies each quantized weight by one vector (MLX's quantized
matrix-vector kernel: fast). A pass over many rows (a batch of streams, a verification pass,
the new part of a prompt after a cached prefix) uses MLX's quantized matrix-matrix kernel,
which on some backends is far slower than reading the weights once would take: on an H200 with
MLX 0.32's CUDA backend, 8B-shaped 4-bit weights, a pass of 32 rows cost ~19x a pass of one
row and a 41-token prompt ~0.1 s, while 2,000 tokens took 0.32 s (issue 18). For such row
counts it is faster to dequantize the weight (one read of the packed weight, one write of it in
the activations' dtype) and use the dense matrix product.

Which row counts gain is measured, not assumed: `calibrate` times both ways on the model's
largest quantized layer for a ladder of row counts, on the device, once at load, and the
layers then take the dense way for the row counts where it was clearly faster.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
LADDER = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
GAIN = 0.75  # the dense way must take at most this fraction of the kernel's time
REPEATS = 3  # timings per way and row count (the best counts)
CALLS = 8  # products per timing, evaluated together (launch costs are then amortized)


class RowsQuantizedLinear(nn.QuantizedLinear):
    """A quantized linear layer that dequantizes its weight for the row counts in `dense`."""

    dense: frozenset[int] = frozenset()  # set per layer by `install`

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if _bucket(rows) not in self.dense:
            return super().__call__(x)
        w = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=getattr(self, "mode", "affine"),
        )
        y = mx.matmul(x, w.astype(x.dtype).T)
        if "bias" in self:
            y = y + self["bias"]
        return y


def _bucket(rows: int) -> int:
    """The ladder step a row count is timed as (the smallest one not below it)."""
    for step in LADDER:
        if rows <= step:
            return step if rows > 1 else 1
    return LADDER[-1] * 2  # beyond the ladder: never dense


def wanted(mode: str) -> bool:
    """Whether to calibrate: auto on MLX's CUDA backend (its Metal kernels do not need it, and
    on a CPU the weights are dequantized at load or multiplied by BLAS), on for any GPU."""
    if mode == "off" or mx.default_device() == mx.cpu:
        return False
    if mode == "on":
        return True
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def _layers(model: Any) -> list[nn.QuantizedLinear]:
    return [m for _, m in model.named_modules() if type(m) is nn.QuantizedLinear]


def _time(fn: Any, x: mx.array) -> float:
    mx.eval(fn(x))  # compile and warm
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        mx.eval([fn(x) for _ in range(CALLS)])
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(model: Any, dtype: mx.Dtype = mx.bfloat16) -> tuple[frozenset[int], str]:
    """Row counts for which the dense way beat the kernel on the model's largest quantized
    layer (empty: keep the kernel everywhere), and a note on what was measured. Only a run of
    wins up to the ladder's top counts: the dense way's cost grows more slowly with the row
    count than the kernel's, so a win below a loss is noise."""
    layers = _layers(model)
    if not layers:
        return frozenset(), ""
    # The transformer blocks' layers run in every pass, the head only at the last position.
    inner = [
        m
        for name, m in model.named_modules()
        if type(m) is nn.QuantizedLinear and ".layers." in f".{name}"
    ]
    layer = max(inner or layers, key=lambda m: m["weight"].size)
    width = int(layer["scales"].shape[-1] * layer.group_size)
    dense: set[int] = set()
    ratios: list[str] = []
    layer.__class__ = RowsQuantizedLinear
    probe: Any = layer
    try:
        for rows in LADDER:
            x = mx.random.normal((rows, width)).astype(dtype)
            probe.dense = frozenset()
            kernel = _time(probe, x)
            probe.dense = frozenset({rows})
            flat = _time(probe, x)
            ratios.append(f"{rows}:{flat / kernel:.2f}")
            if flat <= GAIN * kernel:
                dense.add(rows)
            else:
                dense.clear()
    finally:
        layer.__class__ = nn.QuantizedLinear
        del probe.dense
    note = f"dense/kernel time by rows on a {tuple(layer['weight'].shape)} layer: " + " ".join(
        ratios
    )
    return frozenset(dense), note


def install(model: Any, mode: str) -> str:
    """Calibrate and switch the model's quantized linear layers to the faster way per row
    count; returns a note for the log ("" when nothing was done)."""
    if not wanted(mode) or not _layers(model):
        return ""
    dtype = _activation_dtype(model)
    dense, note = calibrate(model, dtype)
    log.info("quantized matmul calibration: %s", note)
    if not dense:
        return ""
    for layer in _layers(model):
        layer.__class__ = RowsQuantizedLinear
        layer.dense = dense  # type: ignore[attr-defined]
    return f"dense matmul for {min(dense)}-{max(dense)} rows (measured faster)"


def _activation_dtype(model: Any) -> mx.Dtype:
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            return m["scales"].dtype
    return mx.bfloat16
