"""The quart-trio application: routes, JSON errors everywhere, and deliberate timeouts."""

from __future__ import annotations

from quart import Quart, Response, request
from quart_trio import QuartTrio

from ..config import Settings
from ..replay.record import TraceRecorder
from . import openapi, web
from .access import install_access_control
from .admin import routes as admin_routes
from .anthropic import routes as anthropic_routes
from .cors import install_cors
from .errors import install_error_handlers
from .metrics import install_metrics
from .ollama import routes as ollama_routes
from .openai import routes as openai_routes
from .outcome import install_outcomes
from .responses import routes as responses_routes
from .state import ServerState, install_model_pins, models, state


def create_app(settings: Settings, server_state: ServerState) -> QuartTrio:
    app = QuartTrio("mlx_server")
    # Our own per-request deadline ends streams with an in-band error; quart's response timeout
    # would cut an SSE stream silently, so it is off.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes  # larger bodies: 413 JSON
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["mlx_server"] = server_state
    # First: every request gets its id and outcome (access log, --record-trace) before any other
    # hook may answer it.
    recorder = TraceRecorder(settings.record_trace) if settings.record_trace else None
    install_outcomes(app, recorder)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(anthropic_routes.bp)
    app.register_blueprint(ollama_routes.bp)  # Ollama's API under /api
    app.register_blueprint(admin_routes.bp)  # /admin/models*: load, unload, pull
    responses_routes.install(app, settings)
    app.register_blueprint(web.bp)  # the chat page at / (no key needed; its /v1 calls need one)
    install_error_handlers(app)
    install_metrics(app, server_state)  # /metrics, open like /health
    openapi.install_openapi(app, settings)  # /openapi.json, open like /health
    install_cors(app, settings.cors_origins)  # before access control: preflights need no key
    install_access_control(app, settings)
    _require_a_model(app)
    install_model_pins(app)
    _close_after_unread_bodies(app)

    @app.get("/health")
    async def health() -> Response | tuple[dict[str, object], int]:
        st = state()
        body: dict[str, object] = {"status": st.status}
        if st.reason is not None:
            body["reason"] = st.reason
        pool = st.models
        if pool is not None:
            body["model"] = pool.default.name
            body["running"] = pool.running
            body["waiting"] = pool.waiting
            if len(pool.slots) > 1:
                body["models"] = [
                    {
                        "id": slot.name,
                        "loaded": slot.loaded,
                        "running": fe.scheduler.running if (fe := slot.frontend) else 0,
                        "waiting": fe.scheduler.waiting if fe else 0,
                        "bytes": slot.size,
                    }
                    for slot in pool.slots
                ]
                body["model_memory"] = {"budget": pool.budget, "loaded": pool.loaded_bytes()}
        return body, (200 if st.status == "ok" else 503)

    return app


def _require_a_model(app: Quart) -> None:
    """Every /v1 route answers 503 while the model loads or the server stops, before it even
    reads the request, in the route's own error shape."""

    @app.before_request
    async def _ready() -> None:
        if request.path.startswith("/v1/") and request.method != "OPTIONS":
            models()  # raises ServiceUnavailable (503) until the model is ready


def _close_after_unread_bodies(app: Quart) -> None:
    """An error answered before the request body was read (413, 401, 429, ...) ends the
    connection with `Connection: close`.

    Hypercorn closes such a connection itself, but from inside the app's cancel scope, which
    quart-trio cancels as soon as the response is sent: the close is cancelled half-way, the
    connection stays open with unread body bytes, and the client's next request on it hangs
    forever. With `Connection: close` the client opens a new connection instead."""

    @app.after_request
    async def _close(response: Response) -> Response:
        chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
        has_body = bool(request.content_length) or chunked
        unread = response.status_code >= 400 or request.method in ("OPTIONS", "HEAD", "GET")
        if unread and has_body and request.http_version in ("1.0", "1.1"):
            response.headers["Connection"] = "close"
        return response
