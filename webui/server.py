"""One server on one port: the Gradio page at ``/`` and the OpenAI-compatible API under ``/v1``,
sharing one BackendManager (so one generation queue)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from moechat.backends.manager import BackendManager


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
    data_dir: Path | None = None
    load_on_start: bool = True


def build_app(manager: BackendManager, options: ServeOptions):
    """The FastAPI app with the API routes and the Gradio page mounted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi import FastAPI

    from moechat.webui.api import router as api_router
    from moechat.webui.app import build_ui

    app = FastAPI(title="moechat")
    app.include_router(api_router(manager, options))
    blocks = build_ui(manager, options)
    auth = (lambda u, p: options.users.get(u) == p) if options.users else None
    return gr.mount_gradio_app(app, blocks, path="/", auth=auth, footer_links=[])


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
    logger.info("moechat serving on http://{}:{}", options.host, options.port)
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    finally:
        manager.close()
