"""Per-app server state the handlers read: the frontend, once the model has loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from quart import current_app

from ..errors import ServiceUnavailable

if TYPE_CHECKING:
    from ..actors.frontend import Frontend


@attrs.define(eq=False)
class ServerState:
    frontend: Frontend | None = None
    status: str = "loading"  # loading | ok | failed | stopping


def state() -> ServerState:
    return current_app.extensions["mlx_server"]


def frontend() -> Frontend:
    st = state()
    if st.status == "stopping":
        raise ServiceUnavailable("the server is shutting down", code="shutting_down")
    fe = st.frontend
    if fe is None:
        raise ServiceUnavailable("the model is still loading; retry shortly", code="model_loading")
    return fe
