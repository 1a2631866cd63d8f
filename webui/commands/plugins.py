from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    from moechat.backends.plugins import get_plugin_manager

    plugins = get_plugin_manager()
    rows = plugins.listing()
    failures = [{"plugin": f.plugin, "error": f.error} for f in plugins.failures]
    if args.json:
        print(json.dumps({"backends": rows, "failed_plugins": failures}, indent=2))
        return 0
    for r in rows:
        state = "ready" if r["available"] else f"unavailable: {r['reason']}"
        print(f"{r['name']:<20} {r['label']:<50} [{r['plugin']}] {state}")
    for f in failures:
        print(f"BROKEN plugin {f['plugin']}: {f['error']}")
    return 0
