"""Every hook has its documentation section and at least one test that exercises it."""

from __future__ import annotations

import inspect
from pathlib import Path

from moechat.backends import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "moechat_spec")]


def test_there_are_hooks():
    assert set(HOOKS) == {"register_backends", "suggest_backend", "moechat_event"}


def test_every_hook_has_a_section_in_the_plugin_docs():
    doc = (ROOT / "docs" / "plugin-hooks.md").read_text()
    missing = [h for h in HOOKS if f"## `{h}`" not in doc]
    assert missing == []


def test_every_hook_is_exercised_by_a_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py")
    missing = [h for h in HOOKS if f"def {h}(" not in tests]
    assert missing == [], f"no test implements {missing}"


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make run" in head and "make test" in head
