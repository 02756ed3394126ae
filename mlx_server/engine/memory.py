"""Estimate a model's memory before loading it, and refuse one that cannot fit, with a message
instead of the operating system killing the process half way through loading."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

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
