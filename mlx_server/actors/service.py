"""One loaded model: its executor thread, prompt-cache manager, scheduler and frontend,
living in one nursery (so unloading the model is cancelling its scope)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from ..config import Settings
from ..engine import memory
from ..engine import model as model_loading
from ..engine.images import ImageLimits, ImagePolicy
from ..messages import ExecutorCommand
from .cache import CacheManager
from .executor import Executor
from .frontend import Frontend
from .scheduler import GenerationMetrics, Scheduler

if TYPE_CHECKING:
    from ..distributed.rank0 import Rank0
    from ..engine.model import LoadedModel

log = logging.getLogger(__name__)


class ModelIdentity(Protocol):
    """What a service needs to know of its model (`pool.ModelSlot` is one)."""

    name: str
    spec: str | None
    default: bool  # the first --model (the one --draft-model drafts for)


class ModelService:
    """One loaded model: executor thread, cache manager, scheduler and frontend."""

    def __init__(
        self,
        slot: ModelIdentity,
        settings: Settings,
        metrics: GenerationMetrics,
        *,
        rank0: Rank0 | None = None,
    ) -> None:
        self.rank0 = rank0  # distributed serving: the model is sharded over the ranks
        self.slot = slot
        self.settings = settings
        self.metrics = metrics
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()
        self.frontend: Frontend | None = None
        self.weights_bytes = 0

    async def run(
        self, *, task_status: trio.TaskStatus[Frontend] = trio.TASK_STATUS_IGNORED
    ) -> None:
        settings, slot = self.settings, self.slot
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    executor: Executor

                    def to_executor(command: ExecutorCommand) -> None:
                        executor.send(command)

                    cache = CacheManager(settings.prompt_cache_bytes, to_executor)
                    scheduler = Scheduler(
                        to_executor,
                        cache,
                        max_running=settings.max_batch_size or memory.AUTO_BATCH_MIN,
                        max_waiting=settings.max_queue,
                    )
                    executor = Executor(
                        lambda: model_loading.load(
                            slot.spec,
                            served_name=slot.name,
                            cpu_dequantize=settings.cpu_dequantize,  # type: ignore[arg-type]
                            sampling_overrides=settings.sampling_overrides,
                            dense_matmul=settings.dense_matmul,
                            shard=self.rank0.shard if self.rank0 is not None else None,
                        ),
                        on_output=scheduler.on_executor_output,
                        prefill_chunk=settings.prefill_chunk,
                        keep_caches=settings.prompt_cache_bytes > 0,
                        lockstep=self.rank0,
                        speculative=settings.speculative,
                        draft_tokens=settings.draft_tokens,
                        kv_bits=settings.kv_bits,
                        kv_group_size=settings.kv_group_size,
                        disk_dir=settings.prompt_cache_dir,
                        disk_bytes=settings.prompt_cache_disk_bytes,
                        load_draft=self._draft_loader(),
                    )
                    log.info("loading model %s (%s)", slot.name, slot.spec or "bundled default")
                    loaded = await nursery.start(executor.serve)
                    await nursery.start(cache.serve)
                    await nursery.start(scheduler.serve)
                    scheduler.metrics = self.metrics
                    self.weights_bytes = loaded.weights_bytes
                    if not settings.max_batch_size:  # auto: from memory and KV bytes per token
                        scheduler.max_running = memory.auto_batch_size(
                            loaded.config,
                            memory.free_device_bytes(settings.prompt_cache_bytes),
                            dtype_bytes=memory.activation_bytes(loaded.model),
                            kv_bits=settings.kv_bits,
                            kv_group_size=settings.kv_group_size,
                        )
                        log.info("max batch size %d (auto)", scheduler.max_running)
                    self.frontend = Frontend(
                        loaded,
                        scheduler,
                        nursery,
                        timeout=settings.timeout if settings.timeout > 0 else math.inf,
                        default_max_tokens=settings.max_tokens,
                        submit_job=executor.send,
                        images=ImagePolicy(
                            limits=ImageLimits(
                                max_bytes=settings.max_image_bytes,
                                max_pixels=settings.max_image_pixels,
                            ),
                            allow_urls=settings.allow_image_urls,
                        ),
                    )
                    log.info("model %s ready (%s)", loaded.name, loaded.source)
                    task_status.started(self.frontend)
                    await trio.sleep_forever()
        finally:
            self.frontend = None
            self.stopped.set()

    @property
    def busy(self) -> bool:
        fe = self.frontend
        return fe is not None and not fe.idle

    def _draft_loader(self) -> Callable[[], LoadedModel] | None:
        """--draft-model drafts for the first (default) model only, and not when the model is
        sharded over processes (ranks could not agree on drafts)."""
        settings = self.settings
        draft = settings.draft_model
        if draft is None or self.rank0 is not None or not self.slot.default:
            return None
        return lambda: model_loading.load(
            draft,
            cpu_dequantize=settings.cpu_dequantize,  # type: ignore[arg-type]
            dense_matmul=settings.dense_matmul,
        )
