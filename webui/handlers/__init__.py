"""What the page's buttons do, as plain functions over the BackendManager and the ChatStore, one
module per concern: ``context`` (what they share, who may do what), ``loading`` (the model
panel), ``turns`` (the chat), ``chats`` (the chat list), ``stats`` (live stats). Nothing here
imports Gradio. The names below are the package's public ones, for callers that want one import."""

from moechat.webui.handlers.chats import (chat_choices, delete_chat, display, export_chat, import_chat,
                                          message_to_edit, open_chat, rename_chat)
from moechat.webui.handlers.context import Context, may_manage, not_allowed
from moechat.webui.handlers.loading import (backend_choices, backend_help, broken_plugins_text, cancel_load,
                                            load_steps, load_warnings, plan_preview, progress_text, unload)
from moechat.webui.handlers.stats import speed_history, stats_markdown, stats_snapshot
from moechat.webui.handlers.turns import NOTHING_TO_STOP, TurnView, delete_message, run_turn, stop

__all__ = ["Context", "NOTHING_TO_STOP", "TurnView", "backend_choices", "backend_help", "broken_plugins_text",
           "cancel_load", "chat_choices", "delete_chat", "delete_message", "display", "export_chat",
           "import_chat", "load_steps", "load_warnings", "may_manage", "message_to_edit", "not_allowed",
           "open_chat", "plan_preview", "progress_text", "rename_chat", "run_turn", "speed_history",
           "stats_markdown", "stats_snapshot", "stop", "unload"]
