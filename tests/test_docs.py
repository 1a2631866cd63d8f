"""The plugin docs say what the code does: every hook has a section showing the hookspec's own
signature, every event the app emits is named in the docs and the hookspec (and nothing else
is), and the app calls every hook on a plugin that implements it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from moechat.backends import hookspecs
from moechat.backends.api import Backend, BackendError, BackendSettings
from moechat.backends.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "plugin-hooks.md").read_text()
HOOKS = {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "moechat_spec")}


def signature(fn) -> str:
    """``def name(arg: Type, ...) -> Return`` as the hookspec declares it."""
    sig = inspect.signature(fn)
    args = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {fn.__name__}({args}) -> {sig.return_annotation}"


def section(hook: str) -> str:
    parts = DOC.split(f"## `{hook}`\n")
    assert len(parts) == 2, f"docs/plugin-hooks.md needs exactly one section for {hook}"
    return parts[1].split("\n## ")[0]


def test_there_are_hooks():
    assert set(HOOKS) == {"register_backends", "suggest_backend", "inspect_model", "model_file_suffixes",
                          "moechat_event"}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_section_shows_the_hookspec_signature(hook):
    blocks = re.findall(r"```python\n(.*?)```", section(hook), re.S)
    assert any(signature(HOOKS[hook]) in b for b in blocks), (
        f"the {hook} section should show `{signature(HOOKS[hook])}`")
    assert "@hookimpl" in "".join(blocks)


def test_the_events_the_app_emits_are_the_documented_ones():
    code = "\n".join(p.read_text() for d in ("backends", "webui") for p in (ROOT / d).rglob("*.py"))
    emitted = set(re.findall(r"\.emit\(\s*\"(\w+)\"", code))
    documented = set(re.findall(r"`(\w+)`", section("moechat_event").split("; `data`")[0])) - {"name"}
    in_spec = set(re.findall(r"``(\w+)``", inspect.getdoc(HOOKS["moechat_event"]).split("``data``")[0]))
    assert emitted and emitted == documented == in_spec


class RecordingSettings(BackendSettings):
    pass


class RecordingBackend(Backend):
    """Registered by the recording plugin; its plan refuses, so a load emits an event and stops."""

    name = "recording"
    label = "recording"
    description = "records hook calls"
    needs_model = False
    Settings = RecordingSettings

    @classmethod
    def plan(cls, model, settings, machine):
        raise BackendError("The recording backend loads nothing.")


class RecordingPlugin:
    def __init__(self):
        self.called: dict[str, list] = {}

    @hookimpl
    def register_backends(self, register):
        self.called.setdefault("register_backends", []).append(None)
        register(RecordingBackend)

    @hookimpl
    def suggest_backend(self, model):
        self.called.setdefault("suggest_backend", []).append(model.path)
        return "recording"

    @hookimpl
    def moechat_event(self, name, data):
        self.called.setdefault("moechat_event", []).append(name)

    @hookimpl
    def inspect_model(self, path):
        self.called.setdefault("inspect_model", []).append(path)
        return None

    @hookimpl
    def model_file_suffixes(self):
        self.called.setdefault("model_file_suffixes", []).append(None)
        return [".recorded"]


def test_the_app_calls_every_hook_on_a_plugin(tmp_path, monkeypatch):
    """A plugin implementing every hook: listing backends registers its backend, the app's
    suggestion for a model is its answer, and a refused load sends it the event."""
    from moechat.backends import synthetic
    from moechat.backends.manager import BackendManager
    from moechat.backends.plugins import get_plugin_manager

    monkeypatch.setenv("MOECHAT_HOME", str(tmp_path))
    plugin = RecordingPlugin()
    manager = BackendManager(get_plugin_manager([plugin]), tmp_path)
    try:
        assert "recording" in manager.backends()
        assert manager.suggest(synthetic.model_info("synthetic:tiny")) == "recording"
        with pytest.raises(BackendError, match="does not exist"):
            manager.resolve_model(str(tmp_path / "no-such-model"))    # the plugin is asked first
        assert ".recorded" in manager.plugins.model_file_suffixes()
        with pytest.raises(BackendError, match="loads nothing"):
            manager.load("recording", {})
    finally:
        manager.close()
    assert set(plugin.called) == set(HOOKS)
    assert plugin.called["suggest_backend"] == ["synthetic:tiny"]
    assert plugin.called["moechat_event"] == ["load_failed"]   # refused before anything starts
    assert plugin.called["inspect_model"] == [str(tmp_path / "no-such-model")]


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make run" in head and "make test" in head


def test_the_web_ui_page_states_the_characters_per_token_bound_the_worker_uses():
    from moechat.backends.worker import MAX_CHARS_PER_TOKEN
    text = " ".join((ROOT / "docs" / "web-ui.md").read_text().split())
    assert f"more characters than {MAX_CHARS_PER_TOKEN} times the context's tokens" in text


def test_the_web_ui_page_states_how_often_a_streaming_reply_is_redrawn():
    from moechat.webui.handlers.turns import DRAW_EVERY_S
    text = " ".join((ROOT / "docs" / "web-ui.md").read_text().split())
    assert f"redrawn at most every {DRAW_EVERY_S * 1000:.0f} ms" in text
