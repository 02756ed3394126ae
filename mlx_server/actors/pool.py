"""Several models in one server: which are loaded, which a request means, and what to unload.

Each loaded model is a `ModelService` (`service.py`); the `ModelPool` owns the services:

- Names. A model is known by its stable name (the directory basename, the GGUF file's stem, the
  Hugging Face repo id, or the NAME of ``--model NAME=PATH``), by the part of a repo id after the
  organisation, and case-insensitively. The first model is the default one: requests without a
  model, or asking for ``default``, get it, and ``--served-model-name`` / ``--model-aliases``
  apply to it. An unknown name is a 404 in the API's shape.
- Memory. Every model has a size: estimated before loading from its files (safetensors headers,
  GGUF file size), measured after loading (the bytes of its parameters as they sit in memory).
  The loaded models' sizes stay within a budget (``--model-memory-bytes``, default 75% of the
  machine's memory). The first model loads at start-up; the others load in the background while
  they fit, or on their first request. To load one that does not fit, the least recently used
  *idle* model is unloaded first: never one with a request in flight or about to be submitted
  (a request pins its model from the moment its name is resolved until its handler returns;
  streams still running after that are counted by the model's scheduler). When nothing can be
  unloaded yet, the request waits, within its timeout.
- At run time. `load` / `unload` (the admin routes) load or unload a model by name; `add` makes
  a model pulled into the Hugging Face cache servable; with ``--idle-unload SECONDS`` a model
  that has been idle (no pinned request, no stream) that long is unloaded. Each slot's `state`
  is "loaded", "loading" or "available" (known, not in memory).

All of this runs on the trio thread; MLX work stays on each model's executor thread, and the
executor threads take turns on MLX (`executor.MLX_TURNS`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from ..config import Settings
from ..engine import model as model_loading
from ..engine.memory import weights_bytes
from ..errors import (
    ConfigError,
    InvalidRequest,
    NotFound,
    RequestError,
    RequestTimeout,
    ServiceUnavailable,
)
from ..messages import Deadline
from .frontend import Frontend
from .scheduler import GenerationMetrics
from .service import ModelService

if TYPE_CHECKING:
    from ..distributed.rank0 import Rank0

log = logging.getLogger(__name__)

_NAMED = re.compile(r"^([\w.\-:]+)=(.+)$")


def split_model_arg(value: str | None) -> tuple[str | None, str | None]:
    """``NAME=PATH_OR_REPO`` -> (NAME, spec); anything else -> (None, value)."""
    if value is None:
        return None, None
    match = _NAMED.match(value)
    if match is None or Path(value).expanduser().exists():
        return None, value
    spec = match.group(2).strip()
    return match.group(1), os.path.expanduser(spec) if spec.startswith("~") else spec


def estimate_bytes(spec: str | None) -> int:
    """Bytes of weights a model will need, from its files alone (0 when unknown, e.g. a hub
    model not downloaded yet); the measured size replaces it once the model has loaded."""
    try:
        path = model_loading.default_model_path() if spec is None else Path(spec).expanduser()
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return weights_bytes(path)
    except Exception:  # an estimate only: loading reports real problems
        return 0
    return 0


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@attrs.define(eq=False)
class ModelSlot:
    """A model the server was told to serve, loaded or not."""

    name: str
    spec: str | None
    aliases: tuple[str, ...] = ()
    default: bool = False
    size: int = 0  # estimated, then measured once loaded
    service: ModelService | None = None
    loading: trio.Event | None = None
    load_error: BaseException | None = None
    pins: int = 0
    last_used: float = -math.inf
    created: int = attrs.field(factory=lambda: int(time.time()))

    @property
    def frontend(self) -> Frontend | None:
        return self.service.frontend if self.service is not None else None

    @property
    def loaded(self) -> bool:
        return self.frontend is not None

    @property
    def idle(self) -> bool:
        return self.pins == 0 and (self.service is None or not self.service.busy)

    @property
    def state(self) -> str:
        """ "loaded", "loading" (or unloading) or "available" (known, not in memory)."""
        if self.loading is not None or (self.service is not None and self.frontend is None):
            return "loading"
        return "loaded" if self.loaded else "available"

    def matches(self, requested: str) -> bool:
        name, own = requested.lower(), self.name.lower()
        if name in (own, own.rsplit("/", 1)[-1]) or (self.default and name == "default"):
            return True
        return any(fnmatch.fnmatchcase(name, a.lower()) for a in self.aliases)


class ModelPool:
    def __init__(
        self,
        settings: Settings,
        nursery: trio.Nursery,
        metrics: Callable[[], GenerationMetrics],
        *,
        budget: int | None = None,
        rank0: Rank0 | None = None,
    ) -> None:
        self.rank0 = rank0
        self.settings = settings
        self._nursery = nursery
        self._metrics = metrics
        self.slots = make_slots(settings)
        total = physical_memory()
        self.budget = budget or settings.model_memory_bytes or int(0.75 * (total or 1 << 62))
        self._changed = trio.Event()
        self.timeout = settings.timeout if settings.timeout > 0 else math.inf
        self.idle_unload = settings.idle_unload  # seconds; 0: never
        self._idle_since: dict[ModelSlot, float] = {}

    # -- names -----------------------------------------------------------------------------

    @property
    def default(self) -> ModelSlot:
        return self.slots[0]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def resolve(self, requested: object, *, param: str = "model") -> ModelSlot:
        if requested is None or requested == "":
            return self.default
        if not isinstance(requested, str):
            raise InvalidRequest(f"'{param}' must be a string", param=param)
        for slot in self.slots:
            if slot.matches(requested):
                return slot
        served = ", ".join(repr(n) for n in self.names)
        raise NotFound(
            f"the model {requested!r} does not exist; this server serves {served}",
            param=param,
            code="model_not_found",
        )

    # -- load state --------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(fe.scheduler.running for fe in self.frontends())

    @property
    def waiting(self) -> int:
        return sum(fe.scheduler.waiting for fe in self.frontends())

    def frontends(self) -> list[Frontend]:
        return [fe for s in self.slots if (fe := s.frontend) is not None]

    def loaded_bytes(self, *, besides: ModelSlot | None = None) -> int:
        return sum(s.size for s in self.slots if s is not besides and s.service is not None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- start-up and requests --------------------------------------------------------------

    async def start(self) -> Frontend:
        """Load the default model (its failure ends the server), then the others in the
        background while they fit the budget."""
        fe = await self._load(self.default)
        self._nursery.start_soon(self._preload)
        if self.idle_unload > 0:
            self._nursery.start_soon(self._unload_idle, self.idle_unload)
        return fe

    async def _preload(self) -> None:
        for slot in self.slots[1:]:
            if slot.service is None and self.loaded_bytes() + slot.size <= self.budget:
                try:
                    await self._load(slot)
                except Exception as exc:  # reported to the requests that need it
                    log.warning("could not preload model %s: %s", slot.name, exc)

    def deadline(self) -> Deadline:
        """A request's deadline (`--timeout`), starting now: it covers waiting for its model to
        load as well as generating."""
        return Deadline.starting(trio.current_time(), self.timeout)

    async def acquire(
        self, requested: object, *, param: str = "model", deadline: Deadline | None = None
    ) -> tuple[Frontend, Callable[[], None]]:
        """The frontend of the model a request names, loading it if needed (within the
        request's deadline), pinned until the returned release function is called."""
        until = deadline or self.deadline()
        slot = self.resolve(requested, param=param)
        slot.pins += 1
        slot.last_used = trio.current_time()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slot.pins -= 1
                slot.last_used = trio.current_time()
                self._notify()

        try:
            fe = slot.frontend
            if fe is None:
                with trio.move_on_at(until.at) as waited:
                    fe = await self._ensure_loaded(slot)
                if waited.cancelled_caught or fe is None:
                    raise RequestTimeout(
                        f"the model {slot.name!r} could not be loaded within the request's "
                        f"timeout ({until.timeout:g} s): the other models are busy"
                    )
            return fe, release
        except BaseException:
            release()
            raise

    async def _ensure_loaded(self, slot: ModelSlot) -> Frontend:
        while True:
            fe = slot.frontend
            if fe is not None:
                return fe
            if slot.loading is not None:
                await slot.loading.wait()
                if slot.load_error is not None and slot.frontend is None:
                    raise ServiceUnavailable(
                        f"the model {slot.name!r} failed to load: {slot.load_error}",
                        code="model_load_failed",
                    )
                continue
            changed = self._changed
            if await self._make_room(slot):
                if slot.service is None and slot.loading is None:
                    return await self._load(slot)
                continue
            await self._wait_for_change(changed)  # a model became idle: try again

    async def _wait_for_change(self, changed: trio.Event) -> None:
        """Until a pin is released, a model loads or unloads, or a busy model goes idle."""
        async with trio.open_nursery() as nursery:

            async def first(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, changed.wait)
            for fe in self.frontends():
                nursery.start_soon(first, fe.wait_idle)

    async def _make_room(self, slot: ModelSlot) -> bool:
        """Unload idle models, least recently used first, until `slot` fits (waiting until
        their executors have stopped, so their memory is back); False when the models still
        loaded are busy and it does not fit yet."""
        stopping: list[ModelService] = []
        while self.loaded_bytes(besides=slot) + slot.size > self.budget:
            candidates = [
                s
                for s in self.slots
                if s is not slot and s.service is not None and s.idle and s.loading is None
            ]
            if not candidates:
                break
            victim = min(candidates, key=lambda s: s.last_used)
            stopping.append(self._unload(victim))
        for service in stopping:
            await service.stopped.wait()
        # Nothing else loaded: the model loads even if its estimate exceeds the budget.
        over = self.loaded_bytes(besides=slot) + slot.size > self.budget
        return not over or self.loaded_bytes(besides=slot) == 0

    def _unload(
        self, slot: ModelSlot, why: str = "least recently used, idle, to make room"
    ) -> ModelService:
        service = slot.service
        assert service is not None
        log.info("unloading model %s (%s)", slot.name, why)
        slot.service = None
        service.scope.cancel()
        self._notify()
        return service

    async def _load(self, slot: ModelSlot) -> Frontend:
        slot.loading = trio.Event()
        slot.load_error = None
        service = ModelService(slot, self.settings, self._metrics(), rank0=self.rank0)
        slot.service = service
        try:
            fe: Frontend = await self._nursery.start(service.run)
        except BaseException as exc:
            slot.service = None
            slot.load_error = exc
            raise
        finally:
            slot.loading.set()
            slot.loading = None
            self._notify()
        slot.size = service.weights_bytes or slot.size
        if self.loaded_bytes() > self.budget:
            await self._make_room(slot)  # measured bigger than estimated: unload idle others
        return fe

    # -- at run time (the admin routes, --idle-unload) -----------------------------------------

    def add(self, name: str, spec: str) -> ModelSlot:
        """Serve one more model (not loaded yet): `spec` a model directory, `name` its public
        name, which must not clash with a model already served."""
        keys = {name.lower(), name.lower().rsplit("/", 1)[-1]}
        for slot in self.slots:
            if keys & {slot.name.lower(), slot.name.lower().rsplit("/", 1)[-1]}:
                raise InvalidRequest(
                    f"a model named {slot.name!r} is already served", param="model"
                )
        slot = ModelSlot(name=name, spec=spec, size=estimate_bytes(spec))
        self.slots.append(slot)
        self._notify()
        return slot

    async def load(self, slot: ModelSlot) -> Frontend:
        """Load `slot` now (unloading idle others to make room, waiting for busy ones, within
        the request timeout)."""
        slot.last_used = trio.current_time()
        with trio.move_on_after(self.timeout):
            fe = await self._ensure_loaded(slot)
            slot.last_used = trio.current_time()
            return fe
        raise RequestTimeout(
            f"the model {slot.name!r} could not be loaded within {self.timeout:g} s: the other "
            "models are busy"
        )

    async def unload(self, slot: ModelSlot) -> bool:
        """Unload `slot` and wait until its memory is back; False when it was not loaded. A
        model with requests in flight is not unloaded (409)."""
        while slot.loading is not None:
            await slot.loading.wait()
        if slot.service is None:
            return False
        if not slot.idle:
            raise RequestError(
                f"the model {slot.name!r} has requests in flight; unload it when they are done",
                status=409,
                code="model_busy",
            )
        service = self._unload(slot, why="asked to")
        await service.stopped.wait()
        return True

    async def _unload_idle(self, seconds: float) -> None:
        """Unload every model that has been idle (no pinned request, no stream) for `seconds`,
        checked a few times per period."""
        idle_since = self._idle_since
        tick = max(0.05, min(seconds / 4, 5.0))
        while True:
            now = trio.current_time()
            for slot in self.slots:
                if slot.service is None or slot.loading is not None or not slot.idle:
                    idle_since.pop(slot, None)
                    continue
                since = max(idle_since.setdefault(slot, now), slot.last_used)
                if now - since >= seconds:
                    idle_since.pop(slot, None)
                    self._unload(slot, why=f"idle for {seconds:g} s")
            await trio.sleep(tick)

    def expires_in(self, slot: ModelSlot) -> float | None:
        """Seconds until an idle `slot` would be unloaded (None: never, or not loaded)."""
        if self.idle_unload <= 0 or slot.service is None:
            return None
        if not slot.idle:
            return self.idle_unload
        now = trio.current_time()
        since = max(self._idle_since.get(slot, now), slot.last_used)
        return max(0.0, since + self.idle_unload - now)

    # -- shutdown ----------------------------------------------------------------------------

    async def wait_idle(self) -> None:
        async with trio.open_nursery() as nursery:
            for fe in self.frontends():
                nursery.start_soon(fe.scheduler.wait_idle)

    def fail_all(self, message: str) -> None:
        for fe in self.frontends():
            fe.scheduler.fail_all(message)


def make_slots(settings: Settings) -> list[ModelSlot]:
    """The models of the settings, named; raises ConfigError on two models with one name."""
    slots: list[ModelSlot] = []
    for i, value in enumerate(settings.models):
        explicit, spec = split_model_arg(value)
        default = i == 0
        name = explicit or (settings.served_model_name if default else None)
        name = name or model_loading.model_name_for(spec)
        aliases = settings.model_aliases if default else ()
        slots.append(
            ModelSlot(
                name=name, spec=spec, aliases=aliases, default=default, size=estimate_bytes(spec)
            )
        )
    seen: dict[str, str] = {}
    for slot in slots:
        # Full names and the part after a repo id's organisation must all tell models apart.
        keys = {slot.name.lower(), slot.name.lower().rsplit("/", 1)[-1]}
        clash = next((seen[k] for k in keys if k in seen), None)
        if clash is not None:
            raise ConfigError(
                f"two models are named {slot.name!r} and {clash!r}, which requests cannot tell "
                "apart; name them with --model NAME=PATH_OR_REPO"
            )
        seen.update(dict.fromkeys(keys, slot.name))
    return slots


def specs(settings: Settings) -> Sequence[str | None]:
    return [split_model_arg(v)[1] for v in settings.models]
