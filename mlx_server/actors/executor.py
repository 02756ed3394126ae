"""The executor actor: one dedicated OS thread that owns every MLX call.

It loads the model, then runs `BatchEngine` steps for as long as it has work, draining its inbox
(admits, aborts, cache releases) between steps and blocking on it only when idle. Each step's
events go back to the trio side through `TrioToken.run_sync_soon`, so the thread never waits for
the event loop and the event loop never waits for MLX.

MLX keeps a per-thread default stream, which is why this is one real `threading.Thread` and not
`trio.to_thread`'s pool of threads.
"""

from __future__ import annotations

import collections
import gc
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from typing import Any

import trio

from ..distributed.plan import Lockstep, StepPlan
from ..engine.model import LoadedModel
from ..errors import ModelLoadError, ServiceUnavailable
from ..messages import (
    Abort,
    Admit,
    ExecutorCommand,
    ReleaseCache,
    SequenceFailed,
    Shutdown,
    StepOutput,
)

log = logging.getLogger(__name__)


class _Turns:
    """A first-come, first-served lock. With several models loaded, each has its executor
    thread; they take turns on MLX (one command batch or one step per turn), so MLX is never
    entered by two threads at once and a busy model cannot starve another."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()
        self._held = False

    def __enter__(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append(baton)
        baton.acquire()  # the holder hands its turn over by releasing our baton

    def __exit__(self, *exc: object) -> None:
        with self._guard:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


MLX_TURNS = _Turns()


class Job:
    """Arbitrary synchronous work that must run on the executor thread (e.g. embeddings).

    The result or exception is delivered to `on_done` on the trio side."""

    def __init__(
        self, fn: Callable[[LoadedModel], Any], on_done: Callable[[Any, BaseException | None], None]
    ):
        self.fn = fn
        self.on_done = on_done


class Executor:
    """Handle to the executor thread. Created on the trio side; `serve` runs it."""

    def __init__(
        self,
        load: Callable[[], LoadedModel],
        *,
        on_output: Callable[[StepOutput], None],
        prefill_chunk: int = 512,
        keep_caches: bool = True,
        lockstep: Lockstep | None = None,
        speculative: str = "off",
        draft_tokens: int = 6,
        kv_bits: int = 0,
        kv_group_size: int = 64,
        disk_dir: str | None = None,
        disk_bytes: int = 8 << 30,
        load_draft: Callable[[], LoadedModel] | None = None,
    ) -> None:
        self._load = load
        self._load_draft = load_draft  # a draft model for speculative decoding
        # Distributed serving (rank 0): each turn's commands go to the other ranks first.
        self._lockstep = lockstep
        self._reset = False
        self._on_output = on_output
        self._prefill_chunk = prefill_chunk
        self._keep_caches = keep_caches
        self._speculative = speculative
        self._draft_tokens = draft_tokens
        self._kv = (kv_bits, kv_group_size)
        self._disk = (disk_dir, disk_bytes)
        self._disk_hits = 0
        self._inbox: queue.SimpleQueue[ExecutorCommand | Job] = queue.SimpleQueue()
        self.loaded: LoadedModel | None = None
        self.can_reuse_prefix = False
        self.failure: BaseException | None = None

    def send(self, command: ExecutorCommand | Job) -> None:
        """Queue a command; never blocks (safe from the event loop)."""
        self._inbox.put(command)

    async def serve(
        self, *, task_status: trio.TaskStatus[LoadedModel] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the thread, wait for the model to load, report it, and live until cancelled."""
        token = trio.lowlevel.current_trio_token()
        loaded_event = trio.Event()
        done_event = trio.Event()
        outcome: dict[str, Any] = {}

        def on_loaded(model: LoadedModel | None, exc: BaseException | None) -> None:
            outcome["model"], outcome["exc"] = model, exc
            loaded_event.set()

        def thread_main() -> None:
            try:
                self._run(token, on_loaded)
                self.loaded = None
                with MLX_TURNS:  # an unloaded model's memory goes back to the system
                    gc.collect()
                    _clear_mlx_cache()
            finally:
                try:
                    token.run_sync_soon(done_event.set)
                except trio.RunFinishedError:
                    pass

        thread = threading.Thread(target=thread_main, name="mlx-executor", daemon=True)
        thread.start()
        try:
            await loaded_event.wait()
            if outcome["exc"] is not None:
                raise outcome["exc"]
            task_status.started(outcome["model"])
            await done_event.wait()
            if self.failure is not None:
                raise RuntimeError("the executor thread died") from self.failure
        finally:
            self._inbox.put(Shutdown())
            with trio.CancelScope(shield=True):
                await done_event.wait()

    # -- the thread ------------------------------------------------------------------------

    def _run(
        self,
        token: trio.lowlevel.TrioToken,
        on_loaded: Callable[[LoadedModel | None, BaseException | None], None],
    ) -> None:
        try:
            with MLX_TURNS:
                loaded = self._load()
                drafter = self._drafter(loaded)
        except ModelLoadError as exc:
            token.run_sync_soon(on_loaded, None, exc)
            return
        except BaseException as exc:
            log.exception("model loading failed")
            token.run_sync_soon(on_loaded, None, ModelLoadError(f"cannot load the model: {exc}"))
            return
        self.loaded = loaded
        # Imported here, on the executor thread: mlx-lm's import is slow and must not delay
        # the HTTP server, which answers /health with "loading" meanwhile.
        from ..engine.batch import BatchEngine
        from ..engine.disk_cache import DiskCache
        from ..engine.speculative import resolve

        disk = None
        if self._disk[0] is not None and self._keep_caches:
            # The state's identity: which weights (name and source) and their shape.
            config = loaded.config
            model_id = f"{loaded.name}|{loaded.source}|{_vocab_size(loaded)}|" + "|".join(
                str(config.get(k)) for k in ("num_hidden_layers", "hidden_size", "model_type")
            )
            try:
                disk = DiskCache(self._disk[0], budget=self._disk[1], model_id=model_id)
            except OSError as exc:
                log.warning("prompt cache on disk off: %s", exc)

        settings: dict[str, Any] = dict(
            eos_token_ids=loaded.tokenizer.eos_token_ids,
            vocab_size=_vocab_size(loaded),
            prefill_chunk=self._prefill_chunk,
            keep_caches=self._keep_caches,
            tokenizer=loaded.tokenizer,
            speculative=resolve(self._speculative),
            draft_tokens=self._draft_tokens,
            kv_bits=self._kv[0],
            kv_group_size=self._kv[1],
            disk=disk,
        )
        if loaded.vision is not None:  # a vision-language model: image rows beside text rows
            from ..engine.vision_rows import VisionBatchEngine

            engine: BatchEngine = VisionBatchEngine(loaded.vision, **settings)
        else:
            engine = BatchEngine(loaded.model, drafter=drafter, **settings)
        self.can_reuse_prefix = engine.can_reuse
        if self._lockstep is not None:
            engine.share_tokens = self._lockstep.share_tokens
        token.run_sync_soon(on_loaded, loaded, None)

        def post(out: StepOutput) -> None:
            try:
                token.run_sync_soon(self._on_output, out)
            except trio.RunFinishedError:
                pass

        while True:
            command = self._inbox.get() if not engine.has_work else _get_nowait(self._inbox)
            with MLX_TURNS:
                if self._turn(engine, loaded, command, post, token):
                    if disk is not None:
                        disk.close()  # the states queued are written before the exit
                    return

    def _turn(
        self,
        engine: Any,
        loaded: LoadedModel,
        command: ExecutorCommand | Job | None,
        post: Callable[[StepOutput], None],
        token: trio.lowlevel.TrioToken,
    ) -> bool:
        """Handle the commands waiting, then run one step; True once told to shut down. What
        the commands produce (admissions, aborts) goes out with the step's events, in one
        message per turn however many requests a burst admits."""
        drained: list[Any] = []
        handled: list[Any] = []
        while command is not None:
            if isinstance(command, Shutdown):
                self._publish(drained, stop=True)
                ended = engine.abort_all()
                if handled or ended:
                    post(StepOutput(events=(*handled, *ended), batch_size=0))
                return True
            if isinstance(command, Admit | Abort | ReleaseCache):
                drained.append(command)
            handled += self._handle(engine, loaded, command, token)
            command = _get_nowait(self._inbox)
        self._publish(drained, step=engine.has_work)
        if not engine.has_work:
            if handled:
                post(StepOutput(events=tuple(handled), batch_size=len(engine.running)))
            return False
        drafted, accepted = engine.drafted, engine.accepted
        try:
            events = engine.step()
        except Exception as exc:
            log.exception("executor step failed")
            message = f"generation failed: {type(exc).__name__}: {exc}"
            failed = [
                SequenceFailed(request_id=s.request_id, message=message)
                for s in engine.abort_all("error")
            ]
            self._reset = True  # the other ranks end their requests too
            post(StepOutput(events=(*handled, *failed), batch_size=0))
            return False
        post(
            StepOutput(
                events=(*handled, *events),
                batch_size=len(engine.running),
                drafted=engine.drafted - drafted,
                accepted=engine.accepted - accepted,
                kv_bytes=engine.kv_bytes(),
                disk_hits=self._new_disk_hits(engine),
            )
        )
        return False

    def _drafter(self, loaded: LoadedModel) -> Any:
        """The draft model, loaded and checked against the model it drafts for, or None."""
        if self._load_draft is None:
            return None
        from ..engine.draft import Drafter, DraftError, check_pair

        if loaded.vision is not None:
            raise ModelLoadError("--draft-model: vision-language models do not draft")
        draft = self._load_draft()
        try:
            check_pair(
                loaded.tokenizer.backend.get_vocab(with_added_tokens=True),
                draft.tokenizer.backend.get_vocab(with_added_tokens=True),
                draft.model,
            )
        except DraftError as exc:
            raise ModelLoadError(f"--draft-model {draft.name}: {exc}") from None
        log.info("%s drafts for %s", draft.name, loaded.name)
        return Drafter(draft.model, _vocab_size(loaded))

    def _new_disk_hits(self, engine: Any) -> int:
        """States loaded from disk since the last step's report (loads happen at admission)."""
        total = engine.disk.hits if engine.disk is not None else 0
        new, self._disk_hits = total - self._disk_hits, total
        return new

    def _handle(
        self,
        engine: Any,
        loaded: LoadedModel,
        command: ExecutorCommand | Job,
        token: trio.lowlevel.TrioToken,
    ) -> list[Any]:
        """Carry out one command; returns the events it produced."""
        if isinstance(command, Admit):
            try:
                return [engine.admit(command)]
            except Exception as exc:  # one bad request must not take the executor down
                log.exception("admitting %s failed", command.request.request_id)
                return [
                    SequenceFailed(
                        request_id=command.request.request_id,
                        message=f"generation failed: {type(exc).__name__}: {exc}",
                    )
                ]
        if isinstance(command, Abort):
            finished = engine.abort(command.request_id)
            return [finished] if finished is not None else []
        if isinstance(command, ReleaseCache):
            engine.release(command.handles)
        elif isinstance(command, Job):
            try:
                if self._lockstep is not None:  # the other ranks could not take part
                    raise ServiceUnavailable(
                        "embeddings are not available while the model is sharded over processes"
                    )
                result, error = command.fn(loaded), None
            except Exception as exc:
                log.debug("job failed: %s", traceback.format_exc())
                result, error = None, exc
            try:
                token.run_sync_soon(command.on_done, result, error)
            except trio.RunFinishedError:
                pass
        return []

    def _publish(self, commands: list[Any], *, step: bool = False, stop: bool = False) -> None:
        """Distributed serving: tell the other ranks what this turn does, before doing it."""
        if self._lockstep is None or not (commands or step or stop or self._reset):
            return
        plan = StepPlan(commands=tuple(commands), step=step, reset=self._reset, stop=stop)
        self._reset = False
        self._lockstep.publish(plan)


def _get_nowait(q: queue.SimpleQueue[Any]) -> Any:
    try:
        return q.get_nowait()
    except queue.Empty:
        return None


def _clear_mlx_cache() -> None:
    import mlx.core as mx

    mx.clear_cache()


def _vocab_size(loaded: LoadedModel) -> int:
    size = loaded.config.get("vocab_size")
    if isinstance(size, int):
        return size
    return loaded.tokenizer.vocab_size
