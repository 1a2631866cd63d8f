"""``moechat compare PRESET... --prompt TEXT --json FILE``: one prompt through several saved
presets, one after another, with the same numbers the page's Compare view shows.

Presets live in the data directory's compare database, shared with ``moechat serve`` (save them
on the page, or here with ``--save NAME --backend B [--model DIR] [--set KEY=VALUE ...]``)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("presets", nargs="*", metavar="PRESET", help="saved presets to run, in this order")
    p.add_argument("--prompt", default="", help="the prompt every preset gets")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per preset (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy, so outputs compare")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the results as JSON")
    p.add_argument("--markdown", dest="markdown_path", metavar="FILE", help="write the results as Markdown")
    p.add_argument("--no-selfcheck", action="store_true", help="skip the output self-check of each preset")
    p.add_argument("--data-dir", default=None, help="where presets and results live "
                                                    "(default: $MOECHAT_HOME or the user data dir)")
    p.add_argument("--list", action="store_true", help="list the saved presets and exit")
    p.add_argument("--save", metavar="NAME", help="save a preset NAME from --backend, --model and --set, and exit")
    p.add_argument("--backend", help="with --save: the preset's backend")
    p.add_argument("--model", default=None, help="with --save: the model folder (empty: the demo model)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="with --save: a backend setting (repeatable)")


def run(args) -> int:
    from moechat.backends import machine
    from moechat.backends.manager import BackendManager
    from moechat.backends.plugins import get_plugin_manager
    from moechat.webui import compare as cmp

    data_dir = Path(args.data_dir) if args.data_dir else machine.data_dir()
    store = cmp.CompareStore.in_data_dir(data_dir)
    manager = BackendManager(get_plugin_manager(), data_dir)
    try:
        if args.save:
            return save(args, manager, store)
        if args.list:
            for p in store.presets():
                print(f"{p.label()}  {cmp.public_settings(manager, p)}")
            return 0
        if not args.presets:
            print("moechat: name the presets to compare (see `moechat compare --list`), e.g. "
                  "moechat compare a b --prompt 'Hello'.", file=sys.stderr)
            return 2
        presets = [store.preset(name) for name in args.presets]
        runner = cmp.CompareRunner(manager, presets, prompt=args.prompt, user="",
                                   sampling={"temperature": args.temperature, "max_new_tokens": args.max_new_tokens},
                                   after=cmp.AFTER_NOTHING, selfcheck=not args.no_selfcheck)
    except cmp.CompareError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        manager.close()
        return 2
    done = threading.Event()
    try:
        watcher = threading.Thread(target=report_progress, args=(runner, done), daemon=True)
        watcher.start()
        result = runner.run()
    except KeyboardInterrupt:
        runner.cancel()
        result = runner.result
    finally:
        done.set()
        manager.close()
    store.save_run(result)
    if args.json_path:
        Path(args.json_path).write_text(cmp.to_json(result), encoding="utf-8")
    if args.markdown_path:
        Path(args.markdown_path).write_text(cmp.to_markdown(result), encoding="utf-8")
    for what, values in cmp.rows(result):
        print(f"{what:>22}: " + " | ".join(values))
    return 1 if any(e.status != "done" for e in result.entries) else 0


def report_progress(runner, done: threading.Event) -> None:
    """Each entry's status on stderr when it changes."""
    seen: dict[str, str] = {}
    while not done.wait(0.5):
        for e in runner.snapshot().entries:
            line = e.status + (f" ({e.detail})" if e.detail else "")
            if seen.get(e.preset) != line:
                seen[e.preset] = line
                print(f"{e.preset}: {line}", file=sys.stderr)


def save(args, manager, store) -> int:
    from moechat.webui import compare as cmp
    from moechat.webui.cli import parse_settings
    backends = manager.backends()
    if not args.backend or args.backend not in backends:
        print(f"moechat: --save needs --backend, one of {', '.join(sorted(backends))}.", file=sys.stderr)
        return 2
    settings = parse_settings(args.settings)
    if args.model is not None:
        settings["model"] = args.model
    preset = cmp.Preset(args.save, args.backend, settings)
    try:
        cmp.check_settings(manager, preset)
        store.save_preset(preset)
    except cmp.CompareError as exc:
        print(f"moechat: {exc}", file=sys.stderr)
        return 2
    print(f"Saved the preset {preset.label()}.")
    return 0
