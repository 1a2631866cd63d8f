"""``moechat plugins``: list backend plugins (with their distribution and version), whether each
backend can run here, and broken plugins; ``moechat plugins install PATH|NAME`` installs a plugin
into moechat's own environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--strict", action="store_true",
                   help="exit with 1 when a plugin is broken or MOECHAT_PLUGINS names a plugin that is not installed")
    sub = p.add_subparsers(dest="plugins_command", metavar="install")
    inst = sub.add_parser("install", help="install a plugin into the Python environment moechat runs in",
                          description="Install a plugin (a folder with its pyproject.toml, a wheel, or a package "
                                      "name) into the Python environment moechat runs in, with pip.")
    inst.add_argument("target", help="a plugin folder or wheel file, or a package name from your package index")
    inst.add_argument("--editable", "-e", action="store_true", help="install a plugin folder in editable mode")
    inst.add_argument("--upgrade", "-U", action="store_true", help="upgrade it if it is installed already")


def install_command(target: str, editable: bool = False, upgrade: bool = False) -> list[str]:
    """The pip command that installs ``target`` into this interpreter's environment. A local
    folder builds with the environment's own setuptools (no download of build tools)."""
    cmd = [sys.executable, "-m", "pip", "install"]
    if upgrade:
        cmd.append("--upgrade")
    path = Path(target).expanduser()
    if path.exists():
        if path.is_dir():
            cmd.append("--no-build-isolation")
        cmd += ["-e", str(path.resolve())] if editable else [str(path.resolve())]
    else:
        if editable:
            raise SystemExit(f"moechat: --editable takes a plugin folder; {target!r} is not one here.")
        cmd.append(target)
    return cmd


def install(args) -> int:
    cmd = install_command(args.target, args.editable, args.upgrade)
    print("moechat: running " + " ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        print(f"moechat: installing {args.target} failed (pip exited with {done.returncode}); see pip's "
              "message above.", file=sys.stderr)
        return 1
    from moechat.backends.plugins import get_plugin_manager
    plugins = get_plugin_manager()
    print("Installed. Backends now:", ", ".join(sorted(plugins.backends())) or "none")
    return 2 if plugins.failures else 0


def run(args) -> int:
    if getattr(args, "plugins_command", None) == "install":
        return install(args)
    from moechat.backends.plugins import ALLOW_ENV, get_plugin_manager

    plugins = get_plugin_manager()
    rows = plugins.listing()
    failures = [{"plugin": f.plugin, "error": f.error} for f in plugins.failures]
    unmatched = plugins.unmatched_allowed
    if args.json:
        print(json.dumps({"backends": rows, "failed_plugins": failures, "unmatched_allowed": unmatched}, indent=2))
    else:
        for r in rows:
            state = "ready" if r["available"] else f"unavailable: {r['reason']}"
            source = f"{r['distribution']} {r['version']}".strip() or r["plugin"]
            print(f"{r['name']:<20} {r['label']:<50} [{r['plugin']}: {source}] {state}")
        for f in failures:
            print(f"BROKEN plugin {f['plugin']}: {f['error']}")
        for name in unmatched:
            print(f"{ALLOW_ENV} names {name!r}, which matches no installed plugin.")
    if args.strict and (failures or unmatched):
        return 1
    return 0
