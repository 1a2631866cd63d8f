"""What the page parts share: who is asking, from which open page."""

from typing import Any


def user_of(request: Any) -> str:
    return (getattr(request, "username", None) or "") if request is not None else ""


def session_of(request: Any) -> str:
    return getattr(request, "session_hash", None) or "anonymous"
