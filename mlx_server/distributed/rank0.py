"""Rank 0 of a distributed launch: the server proper (HTTP, scheduler, executor) plus what it
takes to drive the other ranks.

- `start` (the runtime calls it before the model loads) opens the control port; the workers
  connect while rank 0 loads, and one that does not within `rank_timeout`, or that goes away,
  is reported at once through the runtime's `on_failure` callback.
- `shard` runs on the executor thread while the model loads: it waits for every worker, tells
  them to join the MLX group, joins it, shards the model, and waits for every worker to have
  its own part.
- `publish`/`share_tokens` are the executor's lockstep hooks (see `actors.executor`).

What a failure means for the server (ending requests, /health, the exit) is the runtime's
business, not this module's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..errors import ConfigError, ModelLoadError
from .control import Hub
from .launch import Launch
from .plan import StepPlan, describe_plan

if TYPE_CHECKING:
    import mlx.nn as nn

    from .group import Group

log = logging.getLogger(__name__)


class Rank0:
    def __init__(
        self,
        launch: Launch,
        *,
        parallel: str,
        rank_timeout: float,
        on_failure: Callable[[str], None],
    ) -> None:
        self.launch = launch
        self.parallel = parallel
        self.rank_timeout = rank_timeout
        self.hub = Hub(launch.size, rank_timeout=rank_timeout, on_failure=on_failure)
        self.group: Group | None = None
        self.plans = 0

    @property
    def failure(self) -> str | None:
        """Why distributed serving failed, once it has."""
        return self.hub.failure

    def start(self) -> None:
        """Open the control port; the workers may connect from now on."""
        try:
            self.hub.listen(self.launch.control_port)
        except OSError as exc:
            raise ConfigError(f"distributed serving: {exc}") from exc

    # -- on the executor thread --------------------------------------------------------------

    def shard(self, model: nn.Module, config: dict[str, Any]) -> str:
        from .group import Group
        from .shard import shard_model

        self.hub.arrived.wait()
        if self.hub.failure is not None:
            raise ModelLoadError(f"distributed start failed: {self.hub.failure}")
        self.hub.go()
        group = Group(self.launch, join_timeout=self.rank_timeout)
        self.group = group
        note = shard_model(
            model,
            group.group,
            self.parallel,
            str(config.get("model_type")),
            backend=self.launch.backend,
        )
        group.barrier()  # every rank has its part of the weights
        self.hub.loaded()
        log.info("%s; %d ranks in lockstep", note, group.size)
        return note

    def publish(self, plan: StepPlan) -> None:
        self.plans += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("plan %d: %s", self.plans, describe_plan(plan))
        self.hub.publish(plan)

    def share_tokens(self, tokens: mx.array) -> mx.array:
        assert self.group is not None
        return self.group.share_tokens(tokens)

    def close(self) -> None:
        self.hub.close()


def open_rank0(
    launch: Launch, *, parallel: str, rank_timeout: float, on_failure: Callable[[str], None]
) -> Rank0:
    """Rank 0's side of distributed serving, its control port open."""
    if launch.rank != 0:
        raise ValueError("only rank 0 serves HTTP")
    rank0 = Rank0(launch, parallel=parallel, rank_timeout=rank_timeout, on_failure=on_failure)
    rank0.start()
    return rank0
