"""Rank 0 of a distributed launch: the server proper (HTTP, scheduler, executor) plus what it
takes to drive the other ranks.

- `shard` runs on the executor thread while the model loads: it joins the MLX group, opens the
  control port and tells the workers where it is, shards the model, and waits for every worker
  to connect and to finish loading its own part.
- `publish`/`share_tokens` are the executor's lockstep hooks (see `actors.executor`).
- `guard` is a trio task: once a worker is lost it ends every request with an in-band error,
  makes /health say "failed", and exits the process non-zero even if the executor thread is
  stuck in a collective with the dead rank.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import trio

from ..errors import ModelLoadError
from .control import Hub
from .launch import Launch
from .plan import StepPlan

if TYPE_CHECKING:
    import mlx.nn as nn

    from ..actors.models import ModelPool
    from ..api.state import ServerState
    from .group import Group

log = logging.getLogger(__name__)

EXIT_RANK_FAILED = 1
CONNECT_TIMEOUT = 120.0  # for every worker to connect, once the group is up


class Rank0:
    def __init__(self, launch: Launch, *, parallel: str, rank_timeout: float) -> None:
        self.launch = launch
        self.parallel = parallel
        self.hub = Hub(launch.size, rank_timeout=rank_timeout)
        self.group: Group | None = None
        self.plans = 0

    # -- on the executor thread --------------------------------------------------------------

    def shard(self, model: nn.Module, config: dict[str, Any]) -> str:
        from .group import Group
        from .shard import shard_model

        group = Group(self.launch)
        self.group = group
        port = self.hub.listen()
        group.broadcast_int(port)  # the workers connect to it now, before they load
        try:
            self.hub.accept_workers(timeout=CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            raise ModelLoadError(f"distributed start failed: {exc}") from exc
        note = shard_model(model, group.group, self.parallel, str(config.get("model_type")))
        group.barrier()  # every rank has its part of the weights
        self.hub.loaded()
        log.info("%s; %d ranks in lockstep", note, group.size)
        return note

    def publish(self, plan: StepPlan) -> None:
        self.plans += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("plan %d: %s", self.plans, _describe(plan))
        self.hub.publish(plan)

    def share_tokens(self, tokens: mx.array) -> mx.array:
        assert self.group is not None
        return self.group.share_tokens(tokens)

    # -- on the trio side --------------------------------------------------------------------

    async def guard(
        self,
        pool: ModelPool,
        server_state: ServerState,
        stop_http: trio.Event,
        http_done: trio.Event,
    ) -> None:
        """Wait for a lost rank; then fail everything in-band and exit non-zero."""
        lost = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def notify() -> None:
            try:
                token.run_sync_soon(lost.set)
            except trio.RunFinishedError:
                pass

        self.hub.on_failure(notify)
        await lost.wait()
        message = f"distributed serving failed: {self.hub.failure}"
        server_state.status = "failed"
        pool.fail_all(message)
        # Let the error events reach the clients and /health say "failed" for a moment, then
        # stop: the executor thread may never come back from a collective with the lost rank.
        await trio.sleep(1.0)
        stop_http.set()
        with trio.move_on_after(3.0):
            await http_done.wait()
        log.error("%s; exiting", message)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RANK_FAILED)

    def close(self) -> None:
        self.hub.close()


def _describe(plan: StepPlan) -> str:
    names = [type(c).__name__ for c in plan.commands]
    flags = [f for f in ("step", "reset", "stop") if getattr(plan, f)]
    return " ".join([*names, *flags]) or "nothing"
