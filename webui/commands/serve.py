from __future__ import annotations

import os
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--host", default=os.environ.get("MOECHAT_HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for the whole LAN (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("MOECHAT_PORT", "7860")))
    p.add_argument("--model", default=os.environ.get("MOECHAT_MODEL", ""),
                   help="model folder to load at start; empty: the built-in demo model")
    p.add_argument("--backend", default=os.environ.get("MOECHAT_BACKEND") or None,
                   help="backend to load it with (see `moechat plugins`); default: suggested for the model")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend setting, e.g. --set vram_budget_gb=22 (repeatable)")
    p.add_argument("--models-dir", default=os.environ.get("MOECHAT_MODELS_DIR"),
                   help="folder whose model folders the page offers (also reads the Hugging Face cache)")
    p.add_argument("--auth", help="require login: USER:PASSWORD, or a file with one USER:PASSWORD a line")
    p.add_argument("--admin", action="append", default=[],
                   help="a user allowed to load and unload models (repeatable); default: every user")
    p.add_argument("--api-key", help="require this key on the OpenAI-compatible API (/v1), or a file with one key "
                                     "a line; without it, --auth logins (USER:PASSWORD) are the API keys")
    p.add_argument("--data-dir", default=None, help="where chats and the demo model live (default: $MOECHAT_HOME or the user data dir)")
    p.add_argument("--no-load", action="store_true", help="start with nothing loaded")


def read_pairs(value: str | None) -> list[str]:
    if not value:
        return []
    path = Path(value)
    if path.is_file():
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [value]


def run(args) -> int:
    from moechat.webui.cli import parse_settings
    from moechat.webui.server import ServeOptions, serve

    users = {}
    for pair in read_pairs(args.auth):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            print(f"moechat: --auth takes USER:PASSWORD (or a file of such lines), got {pair!r}.", file=sys.stderr)
            return 2
        users[user] = password
    if args.data_dir:
        os.environ["MOECHAT_HOME"] = args.data_dir
    options = ServeOptions(
        host=args.host, port=args.port, model=args.model, backend=args.backend,
        settings=parse_settings(args.settings), users=users, admins=set(args.admin),
        api_keys=set(read_pairs(args.api_key)), models_dir=args.models_dir,
        data_dir=Path(args.data_dir) if args.data_dir else None, load_on_start=not args.no_load,
    )
    serve(options)
    return 0
