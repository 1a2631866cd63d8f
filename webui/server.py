"""One server on one port: the Gradio page at ``/`` and the OpenAI-compatible API under ``/v1``,
sharing one BackendManager (so one generation queue)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from moechat.backends.manager import BackendManager
from moechat.webui.security import (DEFAULT_MAX_REQUEST_MB, Access, GuardMiddleware, Throttle,
                                    gradio_session_check, open_lan_warning)


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    model: str = ""
    backend: str | None = None
    settings: dict = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)   # login name -> password; empty: no login
    admins: set[str] = field(default_factory=set)         # who may load/unload; empty: everyone
    api_keys: set[str] = field(default_factory=set)       # empty: the API needs no key
    models_dir: str | None = None
    allowed_folders: list[str] = field(default_factory=list)  # model folders beyond models_dir and the HF cache
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB
    data_dir: Path | None = None
    load_on_start: bool = True


def build_app(manager: BackendManager, options: ServeOptions):
    """The FastAPI app with the API routes and the Gradio page mounted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi import FastAPI
    from starlette.routing import Mount

    from moechat.webui.api import router as api_router
    from moechat.webui.app import build_ui

    app = FastAPI(title="moechat")
    app.include_router(api_router(manager, options))
    blocks = build_ui(manager, options)
    access = Access.from_options(options)
    # With a key or logins, the page needs a login too: Gradio then checks it on every route
    # of the page (its config, API info, queue, uploads, files), not only in the browser.
    auth = access.page_login if access.locked else None
    app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, footer_links=[],
                              auth_message="Log in with your user name and password, or any name and the API key."
                              if access.api_keys else None)
    # mount_gradio_app leaves Blocks.has_launched False, which turns off Gradio's check that a
    # file handed to an event (e.g. Import JSON) was uploaded, not named by path by the client.
    blocks.has_launched = True
    session_ok = None
    if access.locked:
        gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and hasattr(r.app, "tokens"))
        session_ok = gradio_session_check(gradio_app)
    app.add_middleware(GuardMiddleware, max_body=int(options.max_request_mb * 1e6), throttle=Throttle(),
                       session_ok=session_ok)
    return app


def start_initial_load(manager: BackendManager, options: ServeOptions) -> threading.Thread | None:
    """Load the model given on the command line (or the demo model) in the background."""
    if not options.load_on_start:
        return None
    backend = options.backend
    if backend is None:
        if options.model:
            try:
                backend = manager.suggest(manager.resolve_model(options.model)) or "transformers"
            except Exception as exc:
                logger.error("{}", exc)
                return None
        else:
            backend = "transformers"
    settings = dict(options.settings, model=options.model)

    def run() -> None:
        try:
            manager.load(backend, settings)
        except Exception as exc:
            logger.error("Loading {} failed: {}", backend, exc)

    t = threading.Thread(target=run, daemon=True, name="initial-load")
    t.start()
    return t


def serve(options: ServeOptions) -> None:
    import uvicorn

    from moechat.backends.plugins import get_plugin_manager

    manager = BackendManager(get_plugin_manager(), options.data_dir)
    app = build_app(manager, options)
    start_initial_load(manager, options)
    warning = open_lan_warning(options)
    if warning:
        logger.warning(warning)
    logger.info("moechat serving on http://{}:{}", options.host, options.port)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    finally:
        manager.close()
