"""What everything on the page shares: the Context (one per server) and who may do what.

Nothing in moechat.webui.handlers imports Gradio: the page parts in moechat.webui.page wire
these plain functions to components. Each person is known by a user name ("" without login) and
each open page by a session id; a person's Stop or load never touches another session's request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moechat.backends.manager import BackendManager, Generation
from moechat.webui.chats import ChatStore
from moechat.webui.security import Access

if TYPE_CHECKING:
    from moechat.webui.compare import CompareStore


@dataclass
class Context:
    """Everything the handlers share: one per server."""

    manager: BackendManager
    store: ChatStore
    users: dict[str, str] = field(default_factory=dict)
    admins: set[str] = field(default_factory=set)
    models_dir: str | None = None
    operator_settings: dict[str, Any] = field(default_factory=dict)   # moechat serve --set
    folder_roots: list[Path] | None = None   # where the page may load models from; None: anywhere
    sessions: dict[str, Generation] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    compare_runner: Any = None     # the comparison running now (one at a time: it owns the model)
    _stats: dict[str, Any] = field(default_factory=dict)
    _stats_at: float = 0.0
    _compares: Any = None

    @property
    def compares(self) -> CompareStore:
        """Compare presets and runs, in the chat database's folder."""
        from moechat.webui.compare import CompareStore
        with self.lock:
            if self._compares is None:
                self._compares = CompareStore.in_data_dir(self.store.path.parent)
            return self._compares

    @classmethod
    def from_options(cls, manager: BackendManager, options: Any) -> Context:
        from moechat.webui.models import folder_roots

        data_dir = Path(options.data_dir) if getattr(options, "data_dir", None) else manager.data_dir
        roots = folder_roots(options.models_dir, getattr(options, "allowed_folders", ()), options.model or None)
        return cls(manager, ChatStore.in_data_dir(data_dir), dict(options.users or {}),
                   set(options.admins or ()), options.models_dir, operator_settings=dict(options.settings or {}),
                   folder_roots=roots)


def may_manage(ctx: Context, user: str) -> bool:
    """Whether ``user`` may load, unload and ask for memory plans (the one rule: Access)."""
    return Access(admins=frozenset(ctx.admins)).may_manage(user)


def not_allowed(ctx: Context) -> str:
    return Access(admins=frozenset(ctx.admins)).not_allowed()


