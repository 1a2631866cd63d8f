from __future__ import annotations

import os
import sys
from pathlib import Path


def add_arguments(p) -> None:
    from moechat.webui.security import DEFAULT_MAX_REQUEST_MB

    p.add_argument("--host", default=os.environ.get("MOECHAT_HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for the whole LAN (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("MOECHAT_PORT", "7860")))
    p.add_argument("--model", default=os.environ.get("MOECHAT_MODEL", ""),
                   help="model folder to load at start; empty: the built-in demo model")
    p.add_argument("--backend", default=os.environ.get("MOECHAT_BACKEND") or None,
                   help="backend to load it with (see `moechat plugins`); default: suggested for the model")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend setting, e.g. --set vram_budget_gb=22 (repeatable); operator-only settings "
                        "(programs, paths, the remote allow-list) are set only here, never on the page")
    p.add_argument("--models-dir", default=os.environ.get("MOECHAT_MODELS_DIR"),
                   help="folder whose model folders the page offers (also reads the Hugging Face cache)")
    p.add_argument("--allow-folder", action="append", default=[], metavar="DIR",
                   help="another folder whose model folders may be loaded from the page (repeatable); "
                        "by default only --models-dir and the Hugging Face cache")
    p.add_argument("--auth", default=os.environ.get("MOECHAT_AUTH") or None,
                   help="require login: USER:PASSWORD, or a file with one USER:PASSWORD a line (or $MOECHAT_AUTH)")
    p.add_argument("--admin", action="append", default=[],
                   help="a login allowed to load, unload and plan models (repeatable; needs --auth); "
                        "default: everyone who may log in")
    p.add_argument("--api-key", default=os.environ.get("MOECHAT_API_KEY") or None,
                   help="require this key on the API and the page, or a file with one key a line (or $MOECHAT_API_KEY); "
                        "without it, --auth logins (USER:PASSWORD) are the API keys")
    p.add_argument("--max-request-mb", type=float,
                   default=float(os.environ.get("MOECHAT_MAX_REQUEST_MB", DEFAULT_MAX_REQUEST_MB)),
                   help=f"refuse request bodies larger than this (HTTP 413; default {DEFAULT_MAX_REQUEST_MB:g})")
    p.add_argument("--data-dir", default=None, help="where chats and the demo model live (default: $MOECHAT_HOME or the user data dir)")
    p.add_argument("--no-load", action="store_true", help="start with nothing loaded")


class ConfigError(Exception):
    """A start-up option that would leave the server open; the message says how to fix it."""


def looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", "\\")) or value.startswith(("~", ".")) or value.endswith(".txt")


def read_pairs(value: str | None, option: str, what: str) -> list[str]:
    """The lines of ``value`` when it is a file, else ``value`` itself. A value that looks like a
    path but names no file, and a file with nothing in it, are refused (they would fail open)."""
    if value is None:
        return []
    path = Path(value).expanduser()
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not lines:
            raise ConfigError(f"{option} {value}: the file holds no {what}; add one a line (or fix the path).")
        return lines
    if looks_like_path(value):
        raise ConfigError(f"{option} {value}: no such file. Give an existing file with one {what[:-1]} a line, "
                          "or the value itself.")
    if not value.strip():
        raise ConfigError(f"{option} is empty; give a value or leave the option out.")
    return [value]


def options_from(args):
    """The ServeOptions of the command line; ConfigError for options that would fail open."""
    from moechat.webui.cli import parse_settings
    from moechat.webui.security import config_errors
    from moechat.webui.server import ServeOptions

    users = {}
    for pair in read_pairs(args.auth, "--auth", "USER:PASSWORD lines"):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ConfigError(f"--auth takes USER:PASSWORD (or a file of such lines), got {pair!r}.")
        users[user] = password
    if args.max_request_mb <= 0:
        raise ConfigError(f"--max-request-mb must be more than 0, got {args.max_request_mb:g}.")
    options = ServeOptions(
        host=args.host, port=args.port, model=args.model, backend=args.backend,
        settings=parse_settings(args.settings), users=users, admins=set(args.admin),
        api_keys=set(read_pairs(args.api_key, "--api-key", "keys")), models_dir=args.models_dir,
        allowed_folders=list(args.allow_folder), max_request_mb=args.max_request_mb,
        data_dir=Path(args.data_dir) if args.data_dir else None, load_on_start=not args.no_load,
    )
    errors = config_errors(options)
    if errors:
        raise ConfigError(" ".join(errors))
    return options


def run(args) -> int:
    from moechat.webui.server import serve

    try:
        options = options_from(args)
    except ConfigError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        return 2
    if args.data_dir:
        os.environ["MOECHAT_HOME"] = args.data_dir
    serve(options)
    return 0
