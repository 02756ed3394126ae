"""The root nursery: the HTTP server and the actors, started in order and stopped together.

HTTP comes up first so `/health` can say "loading" while the executor thread loads the model;
then the cache manager and the scheduler start, and the frontend is published to the app.
SIGINT/SIGTERM stop accepting connections, give in-flight requests a grace period, and exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .actors.pool import ModelPool, make_slots
from .actors.pool import specs as model_specs
from .api.app import create_app
from .api.metrics import metrics_of
from .api.state import ServerState
from .config import Settings
from .distributed import launch as distributed
from .engine import model as model_loading

log = logging.getLogger("mlx_server")


def run(settings: Settings) -> int:
    launch = distributed.detect()
    if launch is not None:
        distributed.check_launch(launch, models=len(settings.models), parallel=settings.parallel)
    if launch is not None and launch.rank > 0:  # distributed serving: a worker rank
        from .distributed import worker

        slot = make_slots(settings)[0]
        return worker.run(settings, launch, spec=slot.spec, served_name=slot.name)
    trio.run(serve, settings)
    return 0


EXIT_RANK_FAILED = 1


def _exit_now(code: int) -> None:
    """End the process from the trio thread, whatever the MLX thread is stuck in."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    for spec in model_specs(settings):
        model_loading.precheck(spec)
    make_slots(settings)  # two models with one name: a usage error before anything starts
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

        metrics = metrics_of(app)  # the app's /metrics collectors count generations
        rank0 = None
        launch = distributed.detect()
        if launch is not None:  # distributed serving: this is rank 0
            from .distributed.rank0 import open_rank0

            rank_lost = trio.Event()
            lost_why: list[str] = []
            token = trio.lowlevel.current_trio_token()

            def on_rank_failure(reason: str) -> None:  # from any thread, once
                lost_why.append(reason)
                try:
                    token.run_sync_soon(rank_lost.set)
                except trio.RunFinishedError:
                    pass

            async def exit_on_rank_failure() -> None:
                """A lost rank ends the server: every request gets an in-band error, /health
                says "failed" for a moment, then the process exits non-zero even if the MLX
                thread is stuck in a collective with the lost rank."""
                await rank_lost.wait()
                message = f"distributed serving failed: {lost_why[0]}"
                server_state.status = "failed"
                server_state.reason = message
                pool.fail_all(message)
                await trio.sleep(0.5)
                stop_http.set()
                with trio.move_on_after(1.5):
                    await http_done.wait()
                log.error("%s; exiting", message)
                _exit_now(EXIT_RANK_FAILED)

            rank0 = open_rank0(
                launch,
                parallel=settings.parallel,
                rank_timeout=settings.rank_timeout,
                on_failure=on_rank_failure,
            )
            root.start_soon(exit_on_rank_failure)
        pool = ModelPool(settings, root, lambda: metrics, rank0=rank0)
        loaded = await pool.start()
        server_state.models = pool
        server_state.status = "ok"
        log.info("serving %s", ", ".join(pool.names) if len(pool.slots) > 1 else loaded.model_name)
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
            await pool.wait_idle()
        if pool.running or pool.waiting:
            log.info("grace period over; ending %d requests", pool.running + pool.waiting)
            pool.fail_all("the server is shutting down")
        # Let the last bytes (final chunks, error events) reach the clients.
        with trio.move_on_after(2.0):
            await http_done.wait()
        root.cancel_scope.cancel()
