"""A fast path for MLX's CPU backend on Linux.

MLX's Linux CPU wheel ships a reference BLAS (fp32 matmul at a few GFLOP/s) and its CPU 4-bit
matmul is slower still. Two changes make prompt processing an order of magnitude faster:

1. Load the system's OpenBLAS with RTLD_GLOBAL *before MLX is imported*, so MLX's BLAS calls
   resolve to it (`preload_blas`, called first thing by the CLI). `MLX_SERVER_BLAS=off` skips it;
   `MLX_SERVER_BLAS=/path/to/libopenblas.so.0` picks a library.
2. Run the model in float32 (`prepare_for_device`): quantized layers are dequantized and half
   precision weights cast, because the fast BLAS is fp32 and CPU half-precision math is slow.
   Only when the fp32 weights fit a budget (8 GiB, and half the available memory);
   `--cpu-dequantize` overrides the choice.

On Metal or CUDA nothing here changes anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Policy = Literal["auto", "always", "never"]
FP32_BUDGET_BYTES = 8 << 30

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

_loaded: str | None = None


def preload_blas(environ: dict[str, str] | None = None) -> str | None:
    """Load an optimized BLAS for MLX's CPU backend; return its path, or None.

    A no-op off Linux, when disabled, when none is found, or once MLX is already imported
    (too late to interpose its symbols)."""
    global _loaded
    env = os.environ if environ is None else environ
    choice = env.get("MLX_SERVER_BLAS", "auto").strip()
    if _loaded is not None or not sys.platform.startswith("linux") or choice.lower() == "off":
        return _loaded
    if "mlx.core" in sys.modules:
        log.debug("mlx is already imported; not loading a BLAS")
        return None
    paths = [choice] if choice.lower() != "auto" else _find_openblas()
    for path in paths:
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            if choice.lower() != "auto":
                log.warning("MLX_SERVER_BLAS=%s could not be loaded: %s", choice, exc)
            continue
        _loaded = path
        return path
    return None


def _find_openblas() -> list[str]:
    found = [p for p in _CANDIDATES if Path(p).exists()]
    if found:  # find_library starts ldconfig (and gcc): only when the usual places are empty
        return found
    name = ctypes.util.find_library("openblas")
    return [name] if name else []


def blas_loaded() -> str | None:
    return _loaded


def prepare_for_device(model: object, policy: Policy) -> str:
    """Convert the model's weights for the device it runs on; return what was done."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    if policy == "never":
        return "weights as stored"
    on_cpu = mx.default_device() == mx.cpu
    if policy == "auto" and not (on_cpu and _loaded is not None):
        return "weights as stored"
    assert isinstance(model, nn.Module)
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    fp32_bytes = 0
    for name, p in params:
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        elements = p.size * (32 // _bits_of(model, name)) if p.dtype == mx.uint32 else p.size
        fp32_bytes += elements * 4
    if policy == "auto":
        from .memory import available_bytes

        avail = available_bytes()
        budget = FP32_BUDGET_BYTES if avail is None else min(FP32_BUDGET_BYTES, avail // 2)
        if fp32_bytes > budget:
            return f"weights as stored (float32 would need {fp32_bytes / 2**30:.1f} GiB)"
    if any(
        isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules()
    ):
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    model.update(
        tree_map(
            lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    mx.eval(model.parameters())
    return f"float32 weights for the CPU ({fp32_bytes / 2**20:.0f} MiB, BLAS {_loaded})"


def _bits_of(model: object, param_name: str) -> int:
    """Bit width of a packed quantized weight, from its module."""
    module_path = param_name.rsplit(".", 1)[0]
    module: object = model
    for part in module_path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return int(getattr(module, "bits", 4))
