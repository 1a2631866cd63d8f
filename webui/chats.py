"""Chats in SQLite, in the user's data directory, written as they happen.

A reply is stored while it streams (status ``streaming``); when the server starts, every reply
still marked ``streaming`` was cut off by a crash or a restart and becomes ``interrupted``.
Every query takes the user: with login on, a person sees only their own chats ("" without login).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL DEFAULT '',
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done',
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_chat ON messages(chat_id, position);
CREATE INDEX IF NOT EXISTS chats_user ON chats(user, updated);
"""

NEW_TITLE = "New chat"
# Statuses of a message. A reply with one of CUT_STATUSES did not end on its own.
STATUSES = ("done", "streaming", "stop", "length", "cancelled", "error", "interrupted")
CUT_STATUSES = ("cancelled", "error", "interrupted")
CUT_LABELS = {
    "cancelled": "stopped",
    "error": "cut off by an error",
    "interrupted": "cut off: the server stopped while it was writing",
}
FORMAT = "moechat-chat"


class ChatError(Exception):
    """A chat that does not exist (for this user) or a file that is not a chat; the message says which."""


@dataclass
class StoredMessage:
    id: int
    role: str
    content: str
    status: str = "done"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cut(self) -> bool:
        return self.status in CUT_STATUSES


@dataclass
class Chat:
    id: int
    user: str
    title: str
    system_prompt: str
    created: float
    updated: float
    messages: list[StoredMessage] = field(default_factory=list)


@dataclass
class ChatSummary:
    id: int
    title: str
    updated: float
    message_count: int


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """A SQLite connection for one store, shared by its threads behind the store's lock: WAL
    mode, foreign keys on, rows by column name, ``schema`` applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    return db


class ChatStore:
    """The chat database. Thread-safe: one connection behind a lock (SQLite in WAL mode)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = open_database(self.path, SCHEMA)
        with self._lock:
            self.interrupted_on_open = self._db.execute(
                "UPDATE messages SET status='interrupted' WHERE status='streaming'").rowcount

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> ChatStore:
        return cls(Path(data_dir) / "chats.sqlite3")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- chats ----------------------------------------------------------------------------
    def create(self, user: str, title: str = NEW_TITLE, system_prompt: str = "") -> int:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO chats(user, title, system_prompt, created, updated) VALUES (?,?,?,?,?)",
                (user, title, system_prompt, now, now))
            return int(cur.lastrowid)

    def _owned(self, chat_id: int, user: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM chats WHERE id=? AND user=?", (chat_id, user)).fetchone()
        if row is None:
            raise ChatError("That chat does not exist (it may have been deleted).")
        return row

    def get(self, chat_id: int, user: str) -> Chat:
        with self._lock:
            row = self._owned(chat_id, user)
            msgs = [
                StoredMessage(m["id"], m["role"], m["content"], m["status"], json.loads(m["meta"]))
                for m in self._db.execute(
                    "SELECT * FROM messages WHERE chat_id=? ORDER BY position, id", (chat_id,))
            ]
        return Chat(row["id"], row["user"], row["title"], row["system_prompt"], row["created"],
                    row["updated"], msgs)

    def list(self, user: str, query: str = "") -> list[ChatSummary]:
        """The user's chats, newest first; with ``query``, only those whose title or any
        message contains it (case-insensitive)."""
        sql = ("SELECT c.id, c.title, c.updated, (SELECT COUNT(*) FROM messages m WHERE m.chat_id=c.id) AS n "
               "FROM chats c WHERE c.user=?")
        args: list[Any] = [user]
        query = query.strip()
        if query:
            like = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" AND (c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m "
                    "WHERE m.chat_id=c.id AND m.content LIKE ? ESCAPE '\\'))")
            args += [like, like]
        sql += " ORDER BY c.updated DESC, c.id DESC"
        with self._lock:
            return [ChatSummary(r["id"], r["title"], r["updated"], r["n"]) for r in self._db.execute(sql, args)]

    def rename(self, chat_id: int, user: str, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise ChatError("Give the chat a name that is not empty.")
        with self._lock:
            self._owned(chat_id, user)
            self._db.execute("UPDATE chats SET title=?, updated=? WHERE id=?", (title[:200], time.time(), chat_id))

    def delete(self, chat_id: int, user: str) -> None:
        with self._lock:
            self._owned(chat_id, user)
            self._db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
            self._db.execute("DELETE FROM chats WHERE id=?", (chat_id,))

    def set_system_prompt(self, chat_id: int, user: str, prompt: str) -> None:
        with self._lock:
            self._owned(chat_id, user)
            self._db.execute("UPDATE chats SET system_prompt=? WHERE id=?", (prompt, chat_id))

    # ---- messages -------------------------------------------------------------------------
    def append(self, chat_id: int, user: str, role: str, content: str, status: str = "done",
               meta: dict[str, Any] | None = None) -> int:
        now = time.time()
        with self._lock:
            row = self._owned(chat_id, user)
            pos = self._db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM messages WHERE chat_id=?",
                                   (chat_id,)).fetchone()[0]
            cur = self._db.execute(
                "INSERT INTO messages(chat_id, position, role, content, status, meta, created) VALUES (?,?,?,?,?,?,?)",
                (chat_id, pos, role, content, status, json.dumps(meta or {}), now))
            if role == "user" and row["title"] == NEW_TITLE:
                self._db.execute("UPDATE chats SET title=? WHERE id=?", (title_from(content), chat_id))
            self._db.execute("UPDATE chats SET updated=? WHERE id=?", (now, chat_id))
            return int(cur.lastrowid)

    def update_message(self, message_id: int, content: str | None = None, status: str | None = None,
                       meta: dict[str, Any] | None = None) -> None:
        sets, args = [], []
        if content is not None:
            sets.append("content=?")
            args.append(content)
        if status is not None:
            sets.append("status=?")
            args.append(status)
        if meta is not None:
            sets.append("meta=?")
            args.append(json.dumps(meta))
        if not sets:
            return
        with self._lock:
            self._db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", (*args, message_id))
            self._db.execute("UPDATE chats SET updated=? WHERE id=(SELECT chat_id FROM messages WHERE id=?)",
                             (time.time(), message_id))

    def truncate(self, chat_id: int, user: str, keep: int) -> None:
        """Keep the first ``keep`` messages of the chat; delete the rest."""
        with self._lock:
            ids = self._message_ids(chat_id, user)
            for mid in ids[keep:]:
                self._db.execute("DELETE FROM messages WHERE id=?", (mid,))

    def delete_message(self, chat_id: int, user: str, index: int) -> None:
        with self._lock:
            ids = self._message_ids(chat_id, user)
            if not 0 <= index < len(ids):
                raise ChatError(f"This chat has no message number {index + 1}.")
            self._db.execute("DELETE FROM messages WHERE id=?", (ids[index],))

    def _message_ids(self, chat_id: int, user: str) -> list[int]:
        self._owned(chat_id, user)
        return [r[0] for r in self._db.execute(
            "SELECT id FROM messages WHERE chat_id=? ORDER BY position, id", (chat_id,))]

    # ---- export / import ------------------------------------------------------------------
    def export_json(self, chat_id: int, user: str) -> str:
        chat = self.get(chat_id, user)
        return json.dumps({
            "format": FORMAT, "version": 1, "title": chat.title, "system_prompt": chat.system_prompt,
            "created": chat.created, "updated": chat.updated,
            "messages": [{k: v for k, v in asdict(m).items() if k != "id"} for m in chat.messages],
        }, indent=2, ensure_ascii=False)

    def export_markdown(self, chat_id: int, user: str) -> str:
        chat = self.get(chat_id, user)
        out = [f"# {chat.title}", ""]
        if chat.system_prompt:
            out += ["## System", "", chat.system_prompt, ""]
        for m in chat.messages:
            out += [f"## {m.role.capitalize()}", "", m.content, ""]
            note = reply_note(m)
            if note:
                out += [f"*{note}*", ""]
        return "\n".join(out).rstrip() + "\n"

    def import_json(self, user: str, text: str) -> int:
        """Store a chat exported by ``export_json`` (or any JSON with a list of role/content
        messages) as a new chat of ``user``."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ChatError(f"The file is not JSON ({exc}); import a chat exported as JSON.") from exc
        msgs = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in msgs):
            raise ChatError("The file has no list of messages with a role (user, assistant or system) "
                            "and text content; import a chat exported as JSON.")
        title = str(data.get("title") or NEW_TITLE) if isinstance(data, dict) else NEW_TITLE
        system = str(data.get("system_prompt") or "") if isinstance(data, dict) else ""
        system_parts = [m["content"] for m in msgs if m["role"] == "system"]
        if system_parts and not system:
            system = "\n\n".join(system_parts)
        chat_id = self.create(user, title, system)
        for m in msgs:
            if m["role"] == "system":
                continue
            status = m.get("status", "done")
            if status not in STATUSES or status == "streaming":
                status = "interrupted" if status == "streaming" else "done"
            meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
            self.append(chat_id, user, m["role"], m["content"], status, meta)
        return chat_id


def title_from(text: str, limit: int = 48) -> str:
    text = " ".join(text.split()) or NEW_TITLE
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def reply_note(m: StoredMessage) -> str:
    """The line under a reply: who wrote it, how fast, how many tokens, and whether it was cut."""
    if m.role != "assistant":
        return ""
    parts = []
    meta = m.meta
    who = " · ".join(str(x) for x in (meta.get("backend"), meta.get("model")) if x)
    if who:
        parts.append(who)
    if meta.get("ttft_s") is not None:
        parts.append(f"first token {meta['ttft_s']:.2f} s")
    if meta.get("decode_tok_s") is not None:
        parts.append(f"{meta['decode_tok_s']:.1f} tok/s")
    if meta.get("prompt_tokens") is not None or meta.get("completion_tokens") is not None:
        parts.append(f"{meta.get('prompt_tokens') or 0} prompt + {meta.get('completion_tokens') or 0} reply tokens")
    if m.status in CUT_LABELS:
        label = CUT_LABELS[m.status]
        if m.status == "error" and meta.get("error"):
            label += f": {meta['error']}"
        parts.append(f"✂ {label}")
    elif m.status == "streaming":
        parts.append("writing …" if m.content else "waiting for the model …")
    elif m.status == "length":
        parts.append("reached the token limit")
    return " · ".join(parts)
