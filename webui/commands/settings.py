"""``moechat settings BACKEND``: a backend's load settings with their types, defaults, bounds and
descriptions (what ``--set KEY=VALUE`` and the page's form take)."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("backend", help="a backend name (see `moechat plugins`)")
    p.add_argument("--json", action="store_true", help="print JSON")


def describe_settings(settings_cls, needs_model: bool = True) -> list[dict]:
    """One row per field: name, type, default, bounds, description, marks (secret, operator only).
    The inherited ``model`` setting is left out for backends that read no model folder."""
    from pydantic import SecretStr

    from moechat.backends.api import operator_only_fields, secret_fields

    secrets, fixed = secret_fields(settings_cls), operator_only_fields(settings_cls)
    schema = settings_cls.model_json_schema()
    rows = []
    for name, info in settings_cls.model_fields.items():
        if name == "model" and not needs_model:
            continue
        prop = schema.get("properties", {}).get(name, {})
        bounds = {k: prop[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum")
                  if k in prop}
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        secret = name in secrets
        rows.append({
            "name": name, "type": type_name(info.annotation), "required": info.is_required(),
            "default": "(hidden)" if secret and default else (default.get_secret_value() if isinstance(default, SecretStr)
                                                               else default),
            "bounds": bounds, "description": info.description or "",
            "secret": secret, "operator_only": name in fixed,
        })
    return rows


def type_name(annotation) -> str:
    name = getattr(annotation, "__name__", None)
    return name if name and not getattr(annotation, "__args__", None) else str(annotation).replace("typing.", "")


def run(args) -> int:
    from moechat.backends.plugins import get_plugin_manager

    try:
        entry = get_plugin_manager().backend(args.backend)
    except KeyError as exc:
        print(f"moechat: {exc.args[0]}", file=sys.stderr)
        return 1
    rows = describe_settings(entry.cls.Settings, entry.cls.needs_model)
    if args.json:
        print(json.dumps({"backend": entry.name, "settings": rows}, indent=2, default=str))
        return 0
    print(f"{entry.name}: {entry.label}")
    for r in rows:
        marks = [m for m, on in (("required", r["required"]), ("secret", r["secret"]),
                                 ("operator only", r["operator_only"])) if on]
        bounds = ", ".join(f"{k} {v}" for k, v in r["bounds"].items())
        head = f"  {r['name']} ({r['type']}"
        head += ")" if r["required"] else f", default {r['default']!r})"
        if bounds or marks:
            head += " [" + "; ".join(filter(None, [bounds, ", ".join(marks)])) + "]"
        print(head)
        if r["description"]:
            print(f"      {r['description']}")
    print("Set them with `moechat serve --set NAME=VALUE` (or `moechat plan`, `moechat bench`).")
    return 0
