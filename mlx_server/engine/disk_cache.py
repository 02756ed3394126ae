"""Prompt cache on disk (`--prompt-cache-dir`, `--prompt-cache-disk-bytes`): KV states of long
prompts kept across restarts.

A finished request's state (plain KV caches only) is written by a worker thread, never by the
executor's step or the event loop: one `<key>.safetensors` file (each layer's keys and values,
cut to the tokens they cover) and one `<key>.json` header (format version, model identity,
the token ids, the data file's size and SHA-256). After a restart the headers are read back;
a prompt that shares a long enough prefix with a stored one has that prefix loaded instead of
computed. A file whose header is unreadable, of another model or format, or whose data does
not match its size and checksum (truncated, corrupt) is ignored with a warning, and dropped
from the index: it can never reach a request. Files are evicted least recently used first
once their total passes the byte budget; a state that continues a stored one replaces it (a
KV state can be cut to any prefix, so the longer one serves both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

log = logging.getLogger(__name__)

FORMAT = 1


class _Entry:
    def __init__(self, key: str, tokens: tuple[int, ...], nbytes: int, used: float) -> None:
        self.key, self.tokens, self.nbytes, self.used = key, tokens, nbytes, used


class DiskCache:
    """The files of one model in one directory, and the thread that writes them."""

    def __init__(
        self, directory: str | Path, *, budget: int, model_id: str, min_tokens: int = 256
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.model_id = model_id
        self.min_tokens = min_tokens
        self.hits = self.writes = self.rejected = 0
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._queue: queue.SimpleQueue[tuple[tuple[int, ...], list[np.ndarray]] | None] = (
            queue.SimpleQueue()
        )
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="prompt-cache-disk", daemon=True)
        self._thread.start()

    # -- the executor's side ---------------------------------------------------------------

    def put(self, tokens: Sequence[int], caches: Sequence[Any]) -> bool:
        """Queue a finished request's (evaluated, single-sequence) state for writing; False
        when it is not kept (too short, not plain KV, or already on disk)."""
        tokens = tuple(tokens)
        if len(tokens) < self.min_tokens or not all(type(c) is KVCache for c in caches):
            return False
        with self._lock:
            if any(e.tokens[: len(tokens)] == tokens for e in self._entries.values()):
                return False  # a stored state already covers it
        arrays: list[Any] = []
        for c in caches:
            if c.keys is None or c.offset < len(tokens):
                return False
            arrays += [c.keys[..., : len(tokens), :], c.values[..., : len(tokens), :]]
        # Copied and evaluated here, on the thread that owns MLX: the writer only saves
        # evaluated, contiguous buffers.
        arrays = [mx.contiguous(a) for a in arrays]
        mx.eval(arrays)
        self._queue.put((tokens, arrays))
        return True

    def lookup(self, prompt: Sequence[int], longer_than: int = 0) -> tuple[str, int] | None:
        """The stored state sharing the longest prefix with `prompt` (at least `min_tokens`,
        more than `longer_than`, and leaving one prompt token to read): (key, length)."""
        prompt = tuple(prompt)
        best: tuple[str, int] | None = None
        with self._lock:
            for e in self._entries.values():
                n = _common(e.tokens, prompt)
                n = min(n, len(prompt) - 1)
                if n >= self.min_tokens and n > longer_than and (best is None or n > best[1]):
                    best = (e.key, n)
        return best

    def load(self, key: str, length: int, n_layers: int) -> list[KVCache] | None:
        """The first `length` positions of a stored state as fresh caches, or None (with a
        warning, the file dropped from the index) when the file fails any check."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        data = self.dir / f"{key}.safetensors"
        try:
            header = json.loads((self.dir / f"{key}.json").read_text())
            blob = data.read_bytes()
            if len(blob) != header["data_bytes"]:
                raise ValueError(f"{len(blob)} bytes, the header says {header['data_bytes']}")
            if hashlib.sha256(blob).hexdigest() != header["sha256"]:
                raise ValueError("checksum mismatch")
            arrays = mx.load(str(data))
            assert isinstance(arrays, dict)
            caches = []
            for i in range(n_layers):
                c = KVCache()
                k, v = arrays[f"{i}.k"], arrays[f"{i}.v"]
                if k.shape[2] < length or v.shape[2] < length:
                    raise ValueError(f"layer {i} holds {k.shape[2]} positions")
                c.keys, c.values = k[..., :length, :], v[..., :length, :]
                c.offset = length
                caches.append(c)
            if f"{n_layers}.k" in arrays:
                raise ValueError("more layers than the model has")
        except Exception as exc:
            log.warning("prompt cache file %s ignored: %s", data.name, exc)
            self._drop(key, delete=False)
            self.rejected += 1
            return None
        with self._lock:
            entry.used = time.time()
        _touch(data)
        self.hits += 1
        return caches

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def flush(self) -> None:
        """Wait until every state queued so far is written (tests, benchmarks)."""
        done = threading.Event()
        self._queue.put(((), [done]))  # type: ignore[list-item]
        done.wait(timeout=60)

    # -- the worker thread -----------------------------------------------------------------

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            tokens, arrays = item
            if not tokens:  # a flush marker
                arrays[0].set()  # type: ignore[attr-defined]
                continue
            try:
                self._write(tokens, arrays)
            except Exception:
                log.exception("writing a prompt cache file failed")

    def _write(self, tokens: tuple[int, ...], arrays: list[Any]) -> None:
        key = hashlib.sha256(
            (self.model_id + ":" + ",".join(map(str, tokens))).encode()
        ).hexdigest()[:32]
        named = {f"{i // 2}.{'kv'[i % 2]}": a for i, a in enumerate(arrays)}
        data, tmp = self.dir / f"{key}.safetensors", self.dir / f".{key}.tmp.safetensors"
        mx.save_safetensors(str(tmp), named)
        blob = tmp.read_bytes()
        header = {
            "format": FORMAT,
            "model": self.model_id,
            "tokens": list(tokens),
            "data_bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
        }
        os.replace(tmp, data)
        head_tmp = self.dir / f".{key}.json.tmp"
        head_tmp.write_text(json.dumps(header))
        os.replace(head_tmp, self.dir / f"{key}.json")  # the header last: it makes the entry
        with self._lock:
            self._entries[key] = _Entry(key, tokens, len(blob), time.time())
            # States this one continues are served by it (cut to their length).
            covered = [
                k
                for k, e in self._entries.items()
                if k != key and tokens[: len(e.tokens)] == e.tokens
            ]
        for k in covered:
            self._drop(k, delete=True)
        self.writes += 1
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.used)
            total = sum(e.nbytes for e in entries)
            victims = []
            while entries and total > self.budget:
                e = entries.pop(0)
                total -= e.nbytes
                victims.append(e.key)
        for k in victims:
            self._drop(k, delete=True)

    def _drop(self, key: str, *, delete: bool) -> None:
        with self._lock:
            self._entries.pop(key, None)
        if delete:
            for suffix in (".json", ".safetensors"):
                (self.dir / f"{key}{suffix}").unlink(missing_ok=True)

    def _scan(self) -> None:
        """Index the headers already in the directory (a restart)."""
        for head in sorted(self.dir.glob("*.json")):
            key = head.stem
            data = self.dir / f"{key}.safetensors"
            try:
                header = json.loads(head.read_text())
                if header.get("format") != FORMAT:
                    raise ValueError(f"format {header.get('format')!r}")
                if header.get("model") != self.model_id:
                    raise ValueError("another model's state")
                tokens = tuple(int(t) for t in header["tokens"])
                size = data.stat().st_size
                if size != header["data_bytes"]:
                    raise ValueError(f"{size} bytes, the header says {header['data_bytes']}")
            except Exception as exc:
                log.warning("prompt cache file %s ignored: %s", head.name, exc)
                continue
            self._entries[key] = _Entry(key, tokens, size, data.stat().st_mtime)
        self._evict()


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
