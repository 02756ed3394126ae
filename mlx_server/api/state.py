"""Per-app server state the handlers read: the model pool, once the default model has loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from quart import Quart, current_app, g

from ..errors import ServiceUnavailable
from ..messages import Deadline

if TYPE_CHECKING:
    from ..actors.frontend import Frontend
    from ..actors.pool import ModelPool


@attrs.define(eq=False)
class ServerState:
    models: ModelPool | None = None
    status: str = "loading"  # loading | ok | failed | stopping
    reason: str | None = None  # why the status is "failed", for /health


def state() -> ServerState:
    return current_app.extensions["mlx_server"]


def models() -> ModelPool:
    """The model pool; 503 while the default model loads or the server stops."""
    st = state()
    if st.status == "stopping":
        raise ServiceUnavailable("the server is shutting down", code="shutting_down")
    if st.status == "failed":
        raise ServiceUnavailable("the server has failed and is exiting", code="server_failed")
    if st.models is None or st.status != "ok":
        raise ServiceUnavailable("the model is still loading; retry shortly", code="model_loading")
    return st.models


async def use_model(
    requested: object, *, param: str = "model", deadline: Deadline | None = None
) -> Frontend:
    """The frontend of the model a request names (404 for an unknown one), loaded if needed and
    kept loaded until this request's handler has returned (see `install_model_pins`)."""
    fe, release = await models().acquire(requested, param=param, deadline=deadline)
    pins: list[object] = g.setdefault("mlx_server_model_pins", [])
    pins.append(release)
    return fe


def install_model_pins(app: Quart) -> None:
    @app.teardown_request
    async def _release_models(_exc: BaseException | None) -> None:
        for release in g.pop("mlx_server_model_pins", []):
            release()
