"""The root nursery: the HTTP server and the actors, started in order and stopped together.

HTTP comes up first so `/health` can say "loading" while the executor thread loads the model;
then the cache manager and the scheduler start, and the frontend is published to the app.
SIGINT/SIGTERM stop accepting connections, give in-flight requests a grace period, and exit 0.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .actors.cache import CacheManager
from .actors.executor import Executor
from .actors.frontend import Frontend
from .actors.scheduler import Scheduler
from .api.app import create_app
from .api.metrics import metrics_of
from .api.state import ServerState
from .config import Settings
from .engine import model as model_loading
from .messages import ExecutorCommand

log = logging.getLogger("mlx_server")


def run(settings: Settings) -> int:
    trio.run(serve, settings)
    return 0


def _hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    host = settings.host
    config.bind = [f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.shutdown_grace + 2.0
    config.keep_alive_timeout = 75
    return config


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole server until the shutdown trigger fires (default: SIGINT or SIGTERM)."""
    model_loading.precheck(settings.model)
    server_state = ServerState()
    app = create_app(settings, server_state)
    stop_http = trio.Event()

    http_done = trio.Event()

    async def http_shutdown() -> None:
        await stop_http.wait()

    async def serve_http(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await hypercorn_serve(
                app,  # type: ignore[arg-type]
                _hypercorn_config(settings),
                shutdown_trigger=http_shutdown,
                task_status=task_status,
            )
        finally:
            http_done.set()

    async with trio.open_nursery() as root:
        binds = await root.start(serve_http)
        for bind in binds:
            log.info("listening on %s", bind)

        executor: Executor

        def to_executor(command: ExecutorCommand) -> None:
            executor.send(command)

        cache = CacheManager(settings.prompt_cache_bytes, to_executor)
        scheduler = Scheduler(
            to_executor,
            cache,
            max_running=settings.max_batch_size,
            max_waiting=settings.max_queue,
        )
        executor = Executor(
            lambda: model_loading.load(
                settings.model,
                served_name=settings.served_model_name,
                cpu_dequantize=settings.cpu_dequantize,  # type: ignore[arg-type]
            ),
            on_output=scheduler.on_executor_output,
            prefill_chunk=settings.prefill_chunk,
            keep_caches=settings.prompt_cache_bytes > 0,
        )
        log.info("loading model %s", settings.model or model_loading.DEFAULT_MODEL_NAME)
        loaded = await root.start(executor.serve)
        await root.start(cache.serve)
        await root.start(scheduler.serve)
        scheduler.metrics = metrics_of(app)  # the app's /metrics collectors count generations
        server_state.frontend = Frontend(
            loaded,
            scheduler,
            root,
            timeout=settings.timeout if settings.timeout > 0 else math.inf,
            default_max_tokens=settings.max_tokens,
            model_aliases=settings.model_aliases,
            submit_job=executor.send,
        )
        server_state.status = "ok"
        log.info("model %s ready (%s)", loaded.name, loaded.source)
        task_status.started(binds)

        if shutdown_trigger is None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    break
        else:
            await shutdown_trigger()
        server_state.status = "stopping"
        stop_http.set()  # stop accepting connections; open ones may finish
        with trio.move_on_after(settings.shutdown_grace):
            await scheduler.wait_idle()
        if scheduler.running or scheduler.waiting:
            log.info("grace period over; ending %d requests", scheduler.running + scheduler.waiting)
            scheduler.fail_all("the server is shutting down")
        # Let the last bytes (final chunks, error events) reach the clients.
        with trio.move_on_after(2.0):
            await http_done.wait()
        root.cancel_scope.cancel()
