"""Every rank but 0: load this rank's part of the model, then follow rank 0's step plans.

No HTTP, no scheduler, no trio: the main thread owns MLX and loops over the plans that the
control connection queues (see `control.Link`), applying the same executor commands as rank 0
and stepping the same `BatchEngine`; its events are dropped, since rank 0 answers the clients.
The process exits 0 when rank 0 says stop, and 1 at once when rank 0 disappears or the ranks
would no longer be in step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..engine import model as model_loading
from ..errors import ModelLoadError
from ..messages import Abort, Admit, ReleaseCache
from .control import Link, die
from .launch import Launch
from .plan import describe_plan

if TYPE_CHECKING:
    import mlx.nn as nn

    from ..config import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, launch: Launch, *, spec: str | None, served_name: str | None) -> int:
    """Serve as rank `launch.rank`: `spec` is the model (path or repo; None for the bundled
    one) that rank 0 serves, as the runtime resolved it."""
    from .group import Group
    from .shard import shard_model

    link = Link(launch.rank, rank_timeout=settings.rank_timeout)
    host = launch.rank0_host or "127.0.0.1"
    try:
        link.connect(host, launch.control_port, timeout=settings.rank_timeout)
    except OSError as exc:
        raise ModelLoadError(f"rank {launch.rank}: {exc}") from exc
    log.info("rank %d: connected to rank 0 at %s:%d", launch.rank, host, launch.control_port)
    shared: dict[str, Any] = {}

    def shard(model: nn.Module, config: dict[str, Any]) -> str:
        link.wait_go()
        group = Group(launch, join_timeout=settings.rank_timeout)
        note = shard_model(
            model,
            group.group,
            settings.parallel,
            str(config.get("model_type")),
            backend=launch.backend,
        )
        group.barrier()
        link.loaded()
        shared["group"] = group
        return note

    log.info("rank %d of %d: loading %s", launch.rank, launch.size, spec or "the default model")
    loaded = model_loading.load(
        spec,
        served_name=served_name,
        cpu_dequantize=settings.cpu_dequantize,  # type: ignore[arg-type]
        shard=shard,
    )
    from ..engine.batch import BatchEngine

    vocab_size = loaded.config.get("vocab_size")
    engine = BatchEngine(
        loaded.model,
        eos_token_ids=loaded.tokenizer.eos_token_ids,
        vocab_size=vocab_size if isinstance(vocab_size, int) else loaded.tokenizer.vocab_size,
        prefill_chunk=settings.prefill_chunk,
        keep_caches=settings.prompt_cache_bytes > 0,
        tokenizer=loaded.tokenizer,
    )
    engine.share_tokens = shared["group"].share_tokens
    log.info("rank %d ready: %s", launch.rank, loaded.device_note)
    return follow(engine, link)


def follow(engine: Any, link: Link) -> int:
    """Apply rank 0's plans until it says stop."""
    step_failed = False
    plans = 0
    while True:
        plan = link.plans.get()
        plans += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d: plan %d: %s", link.rank, plans, describe_plan(plan))
        if step_failed and not plan.reset:
            die(f"rank {link.rank}: a step failed here but not on rank 0; exiting")
        step_failed = False
        if plan.reset:
            engine.abort_all("error")
        for command in plan.commands:
            if isinstance(command, Admit):
                try:
                    engine.admit(command)
                except Exception:  # rank 0 fails the same admit and ends the request
                    log.exception("admitting %s failed", command.request.request_id)
            elif isinstance(command, Abort):
                engine.abort(command.request_id)
            elif isinstance(command, ReleaseCache):
                engine.release(command.handles)
        if plan.stop:
            engine.abort_all()
            link.stopping()
            log.info("rank %d: rank 0 is shutting down; exiting", link.rank)
            return 0
        if plan.step:
            try:
                engine.step()
            except Exception:
                log.exception("rank %d: step failed", link.rank)
                engine.abort_all("error")
                step_failed = True
