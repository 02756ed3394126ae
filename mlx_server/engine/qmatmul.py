"""Quantized matmuls of several rows, where MLX's kernel for them is slow.

A decode pass of one row multiplies each quantized weight by one vector (MLX's quantized
matrix-vector kernel: fast). A pass over many rows (a batch of streams, a verification pass,
the new part of a prompt after a cached prefix) uses MLX's quantized matrix-matrix kernel,
which on some backends is far slower than reading the weights once would take: on an H200 with
MLX 0.32's CUDA backend, 8B-shaped 4-bit weights, a pass of 32 rows cost ~19x a pass of one
row and a 41-token prompt ~0.1 s, while 2,000 tokens took 0.32 s (issue 18). For such row
counts it is faster to dequantize the weight (one read of the packed weight, one write of it in
the activations' dtype) and use the dense matrix product.

Which row counts gain is measured, not assumed: `calibrate` times whole forward passes both
ways for a ladder of row counts, on the device, once at load, and the layers then take the
dense way for the row counts where it was clearly faster. (Timing one layer alone misled: on
an H200 it showed the kernel ahead below 256 rows, while whole passes of 32 rows ran 2.3x
faster dense: bench/decode_modes.py.)
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
LADDER = (2, 8, 32, 128, 512, 2048)  # few steps: each shape timed is compiled at load
GAIN = 0.8  # the dense way must take at most this fraction of the kernel's time
REPEATS = 2  # timings per way and row count (the best counts)


class RowsQuantizedLinear(nn.QuantizedLinear):
    """A quantized linear layer that dequantizes its weight for the row counts in `dense`."""

    dense: frozenset[int] = frozenset()  # set per layer by `install`

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.shape[-1] else 0
        if rows < 2 or _bucket(rows) not in self.dense:  # (a decode row: no lookup)
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
    """The ladder step a row count is timed as (the smallest one not below it; beyond the
    ladder, its top)."""
    if rows <= 1:
        return 1
    return LADDER[min(bisect.bisect_left(LADDER, rows), len(LADDER) - 1)]


def wanted(mode: str) -> bool:
    """Whether to switch: auto (calibrated) on MLX's CUDA backend (its Metal kernels do not
    need it, and on a CPU the weights are dequantized at load or multiplied by BLAS); on (every
    pass of several rows, no calibration) on any GPU."""
    if mode == "off" or mx.default_device() == mx.cpu:
        return False
    if mode == "on":
        return True
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def _layers(model: Any) -> list[nn.QuantizedLinear]:
    return [m for _, m in model.named_modules() if type(m) is nn.QuantizedLinear]


def _time(fn: Any, *args: Any) -> float:
    mx.eval(fn(*args))  # compile and warm
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _set(layers: list[Any], dense: frozenset[int]) -> None:
    for layer in layers:
        layer.__class__ = RowsQuantizedLinear
        layer.dense = dense


def calibrate(model: Any) -> tuple[frozenset[int], str]:
    """Row counts for which the dense way made the whole model's pass faster (empty: keep the
    kernel everywhere), and a note on what was measured.

    Each step of the ladder times one forward pass over that many one-token rows (what a
    batched decode pass multiplies; no cache, so attention is trivial) both ways. Only a run
    of wins up to the ladder's top counts: the dense way's cost grows more slowly with the row
    count than the kernel's, so a win below a loss is noise."""
    layers: list[Any] = _layers(model)
    if not layers:
        return frozenset(), ""
    dense: set[int] = set()
    ratios: list[str] = []
    try:
        for rows in LADDER:
            tokens = mx.zeros((rows, 1), dtype=mx.int32)
            _set(layers, frozenset())
            kernel = _time(model, tokens)
            _set(layers, frozenset({rows}))
            flat = _time(model, tokens)
            ratios.append(f"{rows}:{flat / kernel:.2f}")
            if flat <= GAIN * kernel:
                dense.add(rows)
            else:
                dense.clear()
    finally:
        for layer in layers:
            layer.__class__ = nn.QuantizedLinear
            del layer.dense
    return frozenset(dense), "dense/kernel time of a pass by rows: " + " ".join(ratios)


def install(model: Any, mode: str) -> str:
    """Calibrate and switch the model's quantized linear layers to the faster way per row
    count; returns a note for the log ("" when nothing was done)."""
    if not wanted(mode) or not _layers(model):
        return ""
    if mode == "on":
        _set(_layers(model), frozenset(LADDER))
        return "dense matmul for every pass of several rows"
    dense, note = calibrate(model)
    log.info("quantized matmul calibration: %s", note)
    if not dense:
        return ""
    _set(_layers(model), dense)
    return f"dense matmul for {min(dense)}-{max(dense)} rows (measured faster)"
