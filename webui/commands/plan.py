"""``moechat plan MODEL_DIR --backend NAME``: will it fit, before a multi-minute load finds out."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("model_dir", help="a model folder (config.json alone will do: plan before downloading the "
                                     "weights), or synthetic:qwen3-next-80b-a3b[?layers=N]")
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
    from moechat.backends.api import BackendError
    from moechat.backends.manager import BackendManager
    from moechat.backends.planning import table, to_dict
    from moechat.backends.plugins import get_plugin_manager
    from moechat.webui.cli import parse_settings

    manager = BackendManager(get_plugin_manager())
    try:
        # weights=False: a folder with only config.json (and the index) will do
        model = manager.resolve_model(args.model_dir, weights=False)
        backend = args.backend or manager.suggest(model) or "transformers"
        checked = manager.check(backend, dict(parse_settings(args.settings), model=args.model_dir),
                                on_machine=machine_for(args), weights=False)
    except BackendError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        return 1
    plan, model = checked.plan, checked.model
    model_path = model.path if model is not None else args.model_dir
    if plan is None:
        print(f"moechat: the {backend} backend cannot plan memory for this model.", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(to_dict(plan), backend=backend, model=model_path), indent=2))
    else:
        print(f"{model.summary()}\nbackend: {backend}" if model is not None else f"backend: {backend}")
        print(table(plan))
    return 0 if plan.fits else 3
