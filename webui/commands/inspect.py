from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="a model folder (config.json, tokenizer, safetensors), or a model file a "
                                     "plugin reads (such as .gguf)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from moechat.backends.api import BackendError
    from moechat.backends.manager import BackendManager
    from moechat.backends.plugins import get_plugin_manager

    manager = BackendManager(get_plugin_manager())
    try:
        info = manager.resolve_model(args.model_dir)
    except BackendError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        return 1
    suggested = manager.suggest(info)
    if args.json:
        print(json.dumps(dict(info.to_dict(), suggested_backend=suggested), indent=2))
    else:
        print(info.summary())
        print(f"weights: {info.weight_bytes / 1e9:.2f} GB in {len(info.shards)} file(s)")
        print(f"suggested backend: {suggested}")
    return 0
