"""The MLX side of a distributed launch: the communication group and the few collectives the
server itself needs (a barrier, broadcasting an integer, every rank taking rank 0's tokens).

Called only on the thread that owns MLX (the executor thread on rank 0, the worker loop on the
others), like every other MLX call in this package.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ModelLoadError
from .launch import Launch


class Group:
    """The global MLX group of this launch, created on the calling thread."""

    def __init__(self, launch: Launch) -> None:
        try:
            group = mx.distributed.init(strict=True, backend=launch.backend)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot join the distributed group ({launch.backend} backend, rank "
                f"{launch.rank} of {launch.size}): {exc}"
            ) from exc
        if group.size() != launch.size or group.rank() != launch.rank:
            raise ModelLoadError(
                f"the {launch.backend} group is rank {group.rank()} of {group.size()}, but the "
                f"launcher said rank {launch.rank} of {launch.size}"
            )
        self.group = group
        self.rank = group.rank()
        self.size = group.size()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (the others pass anything)."""
        mine = mx.array([value if self.rank == 0 else 0], dtype=mx.int64)
        total = mx.distributed.all_sum(mine, group=self.group, stream=mx.cpu)
        return int(total.tolist()[0])  # type: ignore[index]

    def barrier(self) -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group, stream=mx.cpu))

    def share_tokens(self, tokens: mx.array) -> mx.array:
        """Rank 0's sampled tokens on every rank, kept lazy in the step's graph: whatever the
        sampling (greedy, seeded, or from each process's own random state), all ranks then
        feed the same tokens back and their KV caches stay identical."""
        mine = tokens.astype(mx.int32)
        if self.rank != 0:
            # Zeros that still depend on this rank's own step: with a constant here, MLX could
            # run this all-reduce before the model's own ones, out of order with rank 0's.
            mine = mine * 0
        return mx.distributed.all_sum(mine, group=self.group).astype(tokens.dtype)
