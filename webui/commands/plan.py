"""``moechat plan MODEL_DIR --backend NAME``: will it fit, before a multi-minute load finds out."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="a model folder, or synthetic:qwen3-next-80b-a3b[?layers=N]")
    p.add_argument("--backend", help="backend to plan for (see `moechat plugins`); default: suggested for the model")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend setting, e.g. --set max_context=32768 (repeatable)")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="plan for a GPU of this many GiB instead of this machine's (0: no GPU)")
    p.add_argument("--ram-gb", type=float, default=None,
                   help="plan for this many GiB of free host RAM instead of this machine's")
    p.add_argument("--json", action="store_true", help="print JSON")


def machine_for(args):
    """This machine, or the one --gpu-gb / --ram-gb describe."""
    from dataclasses import replace

    from moechat.backends.machine import Gpu, this_machine
    from moechat.backends.planning import GiB

    m = this_machine()
    if args.gpu_gb is not None:
        gpus = [Gpu(0, f"{args.gpu_gb:g} GiB GPU", int(args.gpu_gb * GiB), 0)] if args.gpu_gb > 0 else []
        m = replace(m, gpus=gpus)
    if args.ram_gb is not None:
        m = replace(m, host_total=int(args.ram_gb * GiB), host_available=int(args.ram_gb * GiB))
    return m


def run(args) -> int:
    from pydantic import ValidationError

    from moechat.backends.api import BackendError
    from moechat.backends.manager import BackendManager, settings_error
    from moechat.backends.planning import table, to_dict
    from moechat.backends.plugins import get_plugin_manager
    from moechat.webui.cli import parse_settings

    manager = BackendManager(get_plugin_manager())
    try:
        model = manager.resolve_model(args.model_dir)
        backend = args.backend or manager.suggest(model) or "transformers"
        backends = manager.backends()
        if backend not in backends:
            raise BackendError(f"There is no backend named {backend!r}. Installed: {', '.join(sorted(backends))}.")
        entry = backends[backend]
        try:
            settings = entry.cls.Settings.model_validate(dict(parse_settings(args.settings), model=model.path))
        except ValidationError as exc:
            raise BackendError(settings_error(exc)) from exc
        plan = entry.cls.plan(model, settings, machine_for(args))
    except BackendError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        return 1
    if plan is None:
        print(f"moechat: the {backend} backend cannot plan memory for this model.", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(to_dict(plan), backend=backend, model=model.path), indent=2))
    else:
        print(f"{model.summary()}\nbackend: {backend}")
        print(table(plan))
    return 0 if plan.fits else 3
