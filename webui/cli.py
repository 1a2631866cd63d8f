"""The ``moechat`` command. Each subcommand is a module in ``moechat.webui.commands`` with
``add_arguments(parser)`` and ``run(args) -> int``; importing them is cheap."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from loguru import logger

COMMANDS = {
    "serve": "Serve the web chat (and the OpenAI-compatible API) on HOST:PORT.",
    "plugins": "List backend plugins (with distribution and version), whether each can run here, and broken "
               "plugins; `plugins install PATH|NAME` installs one.",
    "settings": "List a backend's load settings with their types, defaults and descriptions.",
    "inspect": "Describe a model folder (or a model file such as .gguf) and suggest a backend for it.",
    "plan": "Say whether a model fits this machine's GPU and RAM with a backend and settings.",
    "bench": "Measure load time, prefill and decode speed and memory of a backend.",
    "compare": "Run one prompt through several saved presets (backend, model, settings), one after another.",
}


def parse_settings(pairs: list[str]) -> dict:
    """``key=value`` pairs into a dict; values are read as JSON when they parse, else as text."""
    import json
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"moechat: --set takes KEY=VALUE, got {pair!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="moechat", description="Chat with a huge MoE model on one ordinary GPU.")
    parser.add_argument("--log-level", default=os.environ.get("MOECHAT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"moechat.webui.commands.{name}")
        except ModuleNotFoundError:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=args.log_level.upper())
    if not args.command:
        parser.print_help()
        return 2
    try:
        return modules[args.command].run(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
