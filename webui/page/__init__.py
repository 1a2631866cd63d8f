"""The page in parts, one module each: ``loading`` (the model panel), ``turns`` (the chat),
``stats`` (live stats), ``chats`` (the chat list). Each has a ``layout`` function that builds its
column or section and returns its components, and a ``wire`` function that connects them to the
plain functions in moechat.webui.handlers. ``moechat.webui.app.build_ui`` puts them together.

No ``from __future__ import annotations`` in these modules: Gradio reads the event functions'
annotations (``gr.Request``, ``gr.SelectData``) at wiring time, and ``gr`` is imported inside the
functions (no Gradio import when the app module is imported)."""
