"""The chat list: open, search, rename, delete, export and import a person's chats."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from moechat.webui.chats import ChatError, StoredMessage, reply_note
from moechat.webui.handlers.context import Context


def display(messages: list[StoredMessage]) -> list[dict[str, str]]:
    """The chat as the chatbot shows it: each reply with its note (who wrote it, speed, cut)."""
    out = []
    for m in messages:
        if m.role == "system":
            continue
        content = m.content
        note = reply_note(m)
        if note:
            content = (content + "\n\n" if content else "") + f"<sub>{note}</sub>"
        out.append({"role": m.role, "content": content})
    return out


def chat_choices(ctx: Context, user: str, query: str = "") -> list[tuple[str, int]]:
    out = []
    for c in ctx.store.list(user, query or ""):
        when = time.strftime("%d %b %H:%M", time.localtime(c.updated))
        out.append((f"{c.title} · {when}", c.id))
    return out


def open_chat(ctx: Context, user: str, chat_id: int | None) -> tuple[list[dict], str]:
    """The chat's messages (for display) and its system prompt."""
    if chat_id is None:
        return [], ""
    chat = ctx.store.get(int(chat_id), user)
    return display(chat.messages), chat.system_prompt


def export_chat(ctx: Context, user: str, chat_id: int | None, fmt: str) -> str:
    """Write the chat as Markdown (``md``) or JSON to a temporary file and return its path."""
    if chat_id is None:
        raise ChatError("Open or start a chat first, then export it.")
    chat = ctx.store.get(int(chat_id), user)
    text = ctx.store.export_markdown(chat.id, user) if fmt == "md" else ctx.store.export_json(chat.id, user)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", chat.title).strip("-")[:40] or "chat"
    path = Path(tempfile.mkdtemp(prefix="moechat-export-")) / f"{slug}.{fmt}"
    path.write_text(text, encoding="utf-8")
    return str(path)


def import_chat(ctx: Context, user: str, path: str | None) -> int:
    if not path:
        raise ChatError("Choose a JSON file exported from moechat.")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:   # one sentence, whatever the reason: it says nothing of the path
        raise ChatError("The file could not be read as UTF-8 text; import a chat exported as JSON.") from exc
    return ctx.store.import_json(user, text)


def rename_chat(ctx: Context, user: str, chat_id: int | None, title: str) -> None:
    if chat_id is None:
        raise ChatError("Open or start a chat first, then rename it.")
    ctx.store.rename(int(chat_id), user, title or "")


def delete_chat(ctx: Context, user: str, chat_id: int | None) -> None:
    if chat_id is None:
        raise ChatError("Open a chat first, then delete it.")
    ctx.store.delete(int(chat_id), user)


def message_to_edit(ctx: Context, user: str, chat_id: int | None, index: int) -> tuple[int, str] | None:
    """The message number (from 1) and text of the message clicked in the chat, or None when there
    is no such message of this person's."""
    if chat_id is None:
        return None
    try:
        msgs = ctx.store.get(int(chat_id), user).messages
    except ChatError:
        return None
    if not 0 <= index < len(msgs):
        return None
    return index + 1, msgs[index].content
