"""Who may do what, and what a request may be: the one access rule for the page and the API, the
throttle on wrong logins and keys, the request-size limit, and the settings a loader may not set.

The rules (docs/web-ui.md, "Security model"):
- With API keys or logins configured, every route needs one: the page (all its Gradio endpoints)
  takes a login, or any name with an API key as the password; ``/v1`` takes a key (or
  ``USER:PASSWORD`` when there are logins and no keys).
- Loading, unloading and memory plans: everyone who got in, unless admins are named; then only they.
- Settings marked ``json_schema_extra={"operator_only": True}`` (programs, paths outside the model
  folders, the remote allow-list) come only from the operator (``moechat serve --set``); settings
  typed ``SecretStr`` are write-only (never sent back to a browser, never logged).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from moechat.backends.api import operator_only_fields

MAX_FAILURES = 10              # wrong logins or keys from one address within FAILURE_WINDOW_S ...
FAILURE_WINDOW_S = 60.0        # ... and that address gets 429 until the oldest failure is this old
DEFAULT_MAX_REQUEST_MB = 4.0   # a request body larger than this is refused (413) before it is read
MAX_JSON_DEPTH = 32            # deeper JSON in an API request is refused (400)


# ---- who may do what -----------------------------------------------------------------------
@dataclass(frozen=True)
class Access:
    """The one rule for the page and the API."""

    users: dict[str, str] = field(default_factory=dict)   # login -> password
    admins: frozenset[str] = frozenset()                   # who may load/unload/plan; empty: everyone
    api_keys: frozenset[str] = frozenset()

    @classmethod
    def from_options(cls, options: Any) -> Access:
        return cls(dict(options.users or {}), frozenset(options.admins or ()), frozenset(options.api_keys or ()))

    @property
    def locked(self) -> bool:
        """Whether anything needs a login or key (else the server is open to whoever reaches it)."""
        return bool(self.users or self.api_keys)

    def page_login(self, user: str, password: str) -> bool:
        """A login's own password; or, for a name that is not a login, an API key."""
        if user in self.users:
            return same(password, self.users[user])
        return bool(user) and any(same(password, key) for key in self.api_keys)

    def api_keys_by_caller(self) -> dict[str, str | None]:
        """The keys /v1 accepts and whose they are: a plain API key names no user; with logins
        and no key, a login's ``USER:PASSWORD`` is its key (the API is never an open door beside
        a locked page)."""
        if self.api_keys:
            return {k: None for k in self.api_keys}
        return {f"{user}:{password}": user for user, password in self.users.items()}

    def api_caller(self, given: str) -> tuple[bool, str | None]:
        """(accepted, user) for a bearer key."""
        for key, user in self.api_keys_by_caller().items():
            if same(given, key):
                return True, user
        return False, None

    def may_manage(self, user: str | None) -> bool:
        """Whether ``user`` may load, unload and ask for memory plans."""
        return not self.admins or (user or "") in self.admins

    def not_allowed(self) -> str:
        return f"Only {', '.join(sorted(self.admins))} can load, unload or plan models here; ask them to change the model."


def same(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def config_errors(options: Any) -> list[str]:
    """Start-up settings that would fail open, each as a sentence; empty when all is well."""
    out = []
    if options.admins and not options.users:
        out.append("--admin needs --auth: without logins nobody can be known as an admin. "
                   "Add --auth USER:PASSWORD (or a users file) or drop --admin.")
    unknown = sorted(set(options.admins) - set(options.users)) if options.users else []
    if unknown:
        out.append(f"--admin names {', '.join(unknown)}, who {'is' if len(unknown) == 1 else 'are'} not in --auth; "
                   "admins must be logins.")
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_lan_warning(options: Any) -> str | None:
    """The warning for a server reachable from other machines with no key and no login."""
    if is_loopback(options.host) or options.users or options.api_keys:
        return None
    return (f"moechat listens on {options.host} with no --api-key and no --auth: anyone who can reach this "
            "machine can read every chat, load and unload models and use the API. Add --api-key KEY "
            "(or --auth USER:PASSWORD) to lock the page and the API.")


# ---- guessing --------------------------------------------------------------------------------
class Throttle:
    """Failed logins and keys per client address: after MAX_FAILURES within FAILURE_WINDOW_S, the
    address is refused until its oldest failure ages out."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = FAILURE_WINDOW_S):
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, address: str, now: float) -> deque[float]:
        q = self._failures[address]
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            q = self._trim(address, now)
            if len(q) < self.max_failures:
                if not q:
                    self._failures.pop(address, None)
                return 0.0
            return max(0.1, self.window_s - (now - q[0]))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._trim(address, now).append(now)


# ---- the request-size limit and the throttle, before any route -------------------------------
class BodyTooLarge(Exception):
    pass


def throttled_path(method: str, path: str) -> str | None:
    """Which kind of credential a request carries: "api" for /v1, "login" for the page's login."""
    if path == "/v1" or path.startswith("/v1/"):
        return "api"
    if method == "POST" and path.rstrip("/") == "/login":
        return "login"
    return None


# What the login page itself needs before anyone has logged in (the page, its scripts, styles and
# icons, and the login form's POST); with a key or logins every other page route needs a session.
OPEN_PAGE_PATHS = ("/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/gradio_api/theme.css",
                   "/manifest.json", "/robots.txt")
OPEN_PAGE_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


def needs_session(path: str) -> bool:
    """Whether a page route needs a logged-in session when the server is locked (/v1 checks its
    own key)."""
    if path == "/v1" or path.startswith("/v1/"):
        return False
    return path not in OPEN_PAGE_PATHS and not path.startswith(OPEN_PAGE_PREFIXES)


class GuardMiddleware:
    """ASGI middleware in front of the page and the API: a body larger than ``max_body`` bytes
    gets 413 before any route reads it (the Content-Length is checked first; a body without one
    is counted as it arrives); an address with too many wrong logins or keys gets 429; with
    ``session_ok`` (a locked server), a page route other than the login page's own needs a
    logged-in session, whatever Gradio itself checks on that route."""

    def __init__(self, app, max_body: int, throttle: Throttle, session_ok: Callable[[dict], bool] | None = None):
        self.app, self.max_body, self.throttle, self.session_ok = app, max_body, throttle, session_ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self.session_ok is not None and not self.session_ok(scope):
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, receive, send)
        kind = throttled_path(scope["method"], scope["path"])
        address = (scope.get("client") or ("?", 0))[0]
        if self.session_ok is not None and needs_session(scope["path"]) and not self.session_ok(scope):
            return await refuse(send, None, 401, "Not logged in: open the page and log in (or use the API key "
                                                 "as the password with any user name).")
        if kind is not None:
            wait = self.throttle.retry_after(address)
            if wait:
                return await refuse(send, kind, 429, f"Too many wrong {'keys' if kind == 'api' else 'logins'} from "
                                    f"{address}; wait {wait:.0f} s and try again.", retry_after=wait)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await refuse(send, kind, 413, self.too_large())
        started = False
        status = 0
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return message

        async def watching_send(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            if not started:
                await refuse(send, kind, 413, self.too_large())
            return
        if kind == "api" and status == 401 or kind == "login" and status in (400, 401):
            self.throttle.failed(address)

    def too_large(self) -> str:
        return (f"The request is larger than this server's limit of {self.max_body / 1e6:g} MB "
                "(moechat serve --max-request-mb).")


async def refuse(send, kind: str | None, status: int, message: str, retry_after: float | None = None) -> None:
    """An error answer: OpenAI's shape under /v1, ``{"detail": ...}`` elsewhere."""
    if kind == "api":
        code = {413: "request_too_large", 429: "rate_limited"}.get(status)
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    else:
        body = {"detail": message}
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"connection", b"close")]
    if retry_after is not None:
        headers.append((b"retry-after", str(int(retry_after + 0.999)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def gradio_session_check(app) -> Callable[[dict], bool]:
    """Whether a request carries a session cookie that the mounted Gradio app ``app`` gave at login."""
    from http.cookies import SimpleCookie

    names = (f"access-token-{app.cookie_id}", f"access-token-unsecure-{app.cookie_id}")

    def ok(scope: dict) -> bool:
        raw = b"; ".join(v for k, v in scope.get("headers") or [] if k == b"cookie").decode("latin-1")
        if not raw:
            return False
        jar = SimpleCookie()
        try:
            jar.load(raw)
        except Exception:
            return False
        return any(name in jar and jar[name].value in app.tokens for name in names)

    return ok


# ---- JSON and text a request may hold ---------------------------------------------------------
def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (iteratively: any depth is safe to ask)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def bad_text(text: str) -> str | None:
    """A sentence when ``text`` cannot be stored or sent as UTF-8 (a lone surrogate); else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"The text has an invalid character at position {exc.start} (a lone UTF-16 surrogate, "
                f"{text[exc.start]!a}); remove it and send again.")
    return None


# ---- settings only the operator sets, and secret ones ----------------------------------------
def loader_settings(settings_cls: type[BaseModel], given: dict[str, Any], operator: dict[str, Any]) -> dict[str, Any]:
    """The settings of a load asked for on the page: what the loader gave, without the operator-only
    fields, which come from the operator's ``--set`` (or the backend's default) instead."""
    fixed = operator_only_fields(settings_cls)
    out = {k: v for k, v in given.items() if k not in fixed}
    out.update({k: v for k, v in operator.items() if k in fixed})
    return out
