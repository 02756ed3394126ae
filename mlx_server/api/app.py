"""The quart-trio application: routes, JSON errors everywhere, and deliberate timeouts."""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from ..config import Settings
from . import anthropic, completions, embeddings, openai
from .access import install_access_control
from .cors import install_cors
from .errors import install_error_handlers
from .metrics import install_metrics
from .state import ServerState, state


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
    app.register_blueprint(openai.bp)
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(completions.bp)
    app.register_blueprint(embeddings.bp)
    install_error_handlers(app)
    install_metrics(app, server_state)  # /metrics, open like /health
    install_cors(app, settings.cors_origins)  # before access control: preflights need no key
    install_access_control(app, settings)

    @app.get("/health")
    async def health() -> Response | tuple[dict[str, object], int]:
        st = state()
        body: dict[str, object] = {"status": st.status}
        if st.frontend is not None:
            body["model"] = st.frontend.model_name
            body["running"] = st.frontend.scheduler.running
            body["waiting"] = st.frontend.scheduler.waiting
        return body, (200 if st.status == "ok" else 503)

    return app
