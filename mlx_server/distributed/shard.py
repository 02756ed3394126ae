"""Spreading one model over the ranks of a group, right after it is loaded.

- tensor: mlx-lm's own `Model.shard(group)` (llama, mistral, qwen2, qwen3): every attention and
  MLP projection is split over the ranks, with one all-reduce after each block's attention and
  MLP. Needs the head counts to divide by the number of ranks. The only mode over NCCL.
- pipeline: each rank keeps a contiguous run of layers (rank 0 the last ones, as in mlx-lm),
  receives the hidden state from the rank before it, sends its output on, and the final hidden
  state is gathered to every rank (so all of them compute the same logits). mlx-lm's own
  `pipeline(group)` where the architecture has one; otherwise the same scheme applied here to
  the uniform decoder stacks of llama, mistral, qwen2 and qwen3. Needs send/recv: ring, JACCL
  and MPI have them, MLX's NCCL backend does not.

`auto` picks tensor when the model allows it, else pipeline where the backend can carry it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import ModelLoadError
from .launch import PIPELINE_BACKENDS

PARALLEL_MODES = ("auto", "tensor", "pipeline")
_PIPELINE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def choose_parallel(parallel: str, backend: str, problem: str | None, n: int) -> str:
    """The mode to use: `parallel`, or for auto tensor when the model allows it (`problem` is
    None), else pipeline where `backend` can carry it; `ModelLoadError` when neither works."""
    pipeline_ok = backend in PIPELINE_BACKENDS
    if parallel == "auto":
        parallel = "tensor" if problem is None or not pipeline_ok else "pipeline"
    if parallel == "tensor" and problem is not None:
        hint = (
            " (try --parallel pipeline)"
            if pipeline_ok
            else (f"; pipeline parallelism needs send/recv, which MLX's {backend} backend lacks")
        )
        raise ModelLoadError(f"cannot shard this model over {n} ranks (tensor): {problem}{hint}")
    if parallel == "pipeline" and not pipeline_ok:
        raise ModelLoadError(
            f"pipeline parallelism needs send/recv, which MLX's {backend} backend lacks"
        )
    if parallel not in ("tensor", "pipeline"):
        raise ModelLoadError(f"unknown parallel mode {parallel!r}")
    return parallel


def shard_model(
    model: nn.Module, group: Any, parallel: str, model_type: str, *, backend: str
) -> str:
    """Shard `model` in place over `group` (of MLX's `backend`); return a note saying how."""
    n = group.size()
    parallel = choose_parallel(parallel, backend, tensor_problem(model, n), n)
    if parallel == "tensor":
        model.shard(group)  # type: ignore[attr-defined]
    else:
        _pipeline(model, group, model_type)
    mx.eval(model.parameters())
    return f"{parallel} parallel, rank {group.rank()} of {n}"


def tensor_problem(model: nn.Module, n: int) -> str | None:
    """Why `model` cannot be tensor-sharded over `n` ranks; None when it can."""
    if not hasattr(model, "shard"):
        return "mlx-lm has no tensor sharding for this architecture"
    for layer in getattr(model, "layers", []):
        attn = getattr(layer, "self_attn", None)
        for name in ("n_heads", "n_kv_heads"):
            heads = getattr(attn, name, None)
            if isinstance(heads, int) and heads % n:
                return f"{heads} heads ({name}) do not divide by {n}"
    return None


def _pipeline(model: nn.Module, group: Any, model_type: str) -> None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not isinstance(layers, list):
        raise ModelLoadError("cannot pipeline this model: no decoder layer list found")
    rank, n = group.rank(), group.size()
    if len(layers) < n:
        raise ModelLoadError(f"cannot pipeline {len(layers)} layers over {n} ranks")
    if hasattr(inner, "pipeline"):
        inner.pipeline(group)  # mlx-lm's own
        return
    kinds = set(getattr(getattr(inner, "args", None), "layer_types", None) or ["full_attention"])
    if model_type not in _PIPELINE_TYPES or kinds != {"full_attention"}:
        raise ModelLoadError(
            f"cannot pipeline a {model_type} model (pipelining here needs llama, mistral, qwen2 "
            "or qwen3 with full attention in every layer)"
        )
    # Even split, the low ranks taking any extra layer; rank 0 runs the last layers.
    base, extra = divmod(len(layers), n)
    sizes = [base + (1 if r < extra else 0) for r in range(n)]
    start = sum(sizes[rank + 1 :])
    end = start + sizes[rank]
    local = layers[start:end]
    for i, layer in enumerate(local):
        _make_stage(
            layer,
            group,
            recv_from=rank + 1 if i == 0 and rank < n - 1 else None,
            send_to=rank - 1 if i == len(local) - 1 and rank > 0 else None,
            gather=i == len(local) - 1,
        )
    # The other ranks' layers are dropped before their weights are ever read (lazy load);
    # the KV caches then cover only this rank's layers.
    inner.layers = local


def _make_stage(
    layer: nn.Module, group: Any, *, recv_from: int | None, send_to: int | None, gather: bool
) -> None:
    """Give `layer` a subclass whose call receives its input from the previous stage and/or
    passes its output on; attributes the decoder reads (`use_sliding`, ...) are untouched."""
    base = type(layer)

    def __call__(self: nn.Module, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if recv_from is not None:
            x = mx.distributed.recv_like(x, recv_from, group=group)
        h = base.__call__(self, x, *args, **kwargs)
        if send_to is not None:
            h = mx.distributed.send(h, send_to, group=group)
        if gather:
            h = mx.distributed.all_gather(h, group=group)[: x.shape[0]]
            # The prefill evaluates only the KV caches: tie the communication to them so that
            # every rank takes part in it then too.
            cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
            if cache is not None and getattr(cache, "keys", None) is not None:
                cache.keys = mx.depends(cache.keys, h)
        return h

    layer.__class__ = type(f"PipelineStage{base.__name__}", (base,), {"__call__": __call__})
