"""Subcommands of ``moechat``, one module each (see webui/cli.py)."""
