"""Model management without loading anything: slot states, the idle-unload timer (under trio's
autojump clock, with stand-in services), and the checks on repo revisions."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

from mlx_server import hub
from mlx_server.actors.pool import ModelPool, ModelSlot
from mlx_server.actors.scheduler import GenerationMetrics
from mlx_server.config import Settings
from mlx_server.errors import InvalidRequest, RequestError


@attrs.define(eq=False)
class StandIn:
    """What the pool reads of a loaded model's service."""

    busy: bool = False
    frontend: Any = attrs.field(factory=object)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    stopped: trio.Event = attrs.field(factory=trio.Event)


def loaded(slot: ModelSlot, service: StandIn | None = None) -> StandIn:
    service = service or StandIn()
    slot.service = service  # type: ignore[assignment]
    return service


def test_slot_states() -> None:
    slot = ModelSlot(name="m", spec=None)
    assert slot.state == "available"
    loaded(slot, StandIn(frontend=None))  # started, not ready yet
    assert slot.state == "loading"
    slot.service = None
    slot.loading = trio.Event()
    assert slot.state == "loading"
    slot.loading = None
    loaded(slot)
    assert slot.state == "loaded"


def make_pool(nursery: trio.Nursery, idle: float) -> ModelPool:
    settings = Settings(model="one=/nonexistent/one", more_models=("two=/nonexistent/two",))
    return ModelPool(attrs.evolve(settings, idle_unload=idle), nursery, _no_metrics)


def _no_metrics() -> GenerationMetrics:
    raise AssertionError("nothing is loaded here, so nothing is counted")


async def test_idle_models_unload_after_the_period(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        pool = make_pool(nursery, idle=10)
        one, two = pool.slots
        loaded(one)
        busy = loaded(two, StandIn(busy=True))
        nursery.start_soon(pool._unload_idle, 10.0)
        await trio.sleep(1)
        assert pool.expires_in(one) == pytest.approx(9, abs=0.01)
        await trio.sleep(8)
        assert one.state == "loaded"  # idle for 9 s
        await trio.sleep(2)
        assert one.state == "available" and one.service is None
        assert two.state == "loaded"  # busy: never unloaded

        # Idle from the moment it stops being busy, not from when it was last pinned.
        busy.busy = False
        await trio.sleep(9)
        assert two.state == "loaded"
        two.pins = 1  # a request pinned it
        await trio.sleep(20)
        assert two.state == "loaded"
        two.pins = 0
        two.last_used = trio.current_time()
        await trio.sleep(9)
        assert two.state == "loaded"
        # Noticed idle at the next check (checks come every period / 4 = 2.5 s): unloaded by
        # 12.5 s after it was released.
        await trio.sleep(4)
        assert two.state == "available"
        nursery.cancel_scope.cancel()


async def test_unload_refuses_a_busy_model_and_waits_for_an_idle_one() -> None:
    async with trio.open_nursery() as nursery:
        pool = make_pool(nursery, idle=0)
        one, _ = pool.slots
        assert await pool.unload(one) is False  # not loaded
        service = loaded(one, StandIn(busy=True))
        with pytest.raises(RequestError) as busy:
            await pool.unload(one)
        assert busy.value.status == 409 and busy.value.code == "model_busy"
        service.busy = False
        service.stopped.set()
        assert await pool.unload(one) is True
        assert one.state == "available" and service.scope.cancel_called
        assert pool.expires_in(one) is None
        nursery.cancel_scope.cancel()


async def test_add_refuses_a_name_already_served() -> None:
    async with trio.open_nursery() as nursery:
        pool = make_pool(nursery, idle=0)
        added = pool.add("org/three", "/nonexistent/three")
        assert added.state == "available" and pool.resolve("three") is added
        for clash in ("org/one", "ONE", "other/three"):
            with pytest.raises(InvalidRequest):
                pool.add(clash, "/nonexistent/x")
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "a" * 40, "release_2-b"])
def test_revisions_accepted(revision: str) -> None:
    assert hub.check_revision(revision) == revision


@pytest.mark.parametrize(
    "revision",
    ["", "../x", "a/../b", "/main", "main/", "a//b", "a b", "a\\b", "..", "x" * 129, 5, None],
)
def test_revisions_refused(revision: Any) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        hub.check_revision(revision)
    assert excinfo.value.param == "revision"
