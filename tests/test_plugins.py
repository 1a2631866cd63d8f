"""Plugin discovery: entry points, isolation of broken plugins, the allow-list, and the hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from moechat.backends.hookspecs import hookimpl
from moechat.backends.plugins import get_plugin_manager

def install_fake_distribution(site, name, module_source, entry_point):
    """A real distribution on sys.path: a module plus .dist-info with an entry point."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[moechat.backends]\n{entry_point} = {name}\n")


def run_plugins_json(site, **env):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **env)
    out = subprocess.run([sys.executable, "-m", "moechat.webui.cli", "plugins", "--json"],
                         capture_output=True, text=True, timeout=120, env=environ)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


@pytest.fixture
def site(tmp_path):
    install_fake_distribution(tmp_path, "exploding_plugin", "raise RuntimeError('boom at import')\n", "exploding")
    install_fake_distribution(tmp_path, "faulty_register", """
        from moechat.backends.hookspecs import hookimpl

        @hookimpl
        def register_backends(register):
            raise ValueError('cannot register today')
        """, "faulty")
    return tmp_path


def test_builtin_backends_are_entry_points_like_any_plugin():
    found = get_plugin_manager().backends()
    assert {"transformers", "transformers-bnb4", "fake"} <= set(found)
    assert found["transformers"].plugin == "transformers"  # registered by its entry point's name
    assert found["fake"].plugin == "fake"


def test_broken_plugins_are_reported_and_the_rest_still_load(site):
    listing, stderr = run_plugins_json(site)
    names = {b["name"] for b in listing["backends"]}
    assert {"transformers", "fake"} <= names
    failed = {f["plugin"]: f["error"] for f in listing["failed_plugins"]}
    assert "boom at import" in failed["exploding"]
    assert "cannot register today" in failed["faulty"]
    assert "exploding" in stderr  # logged too


def test_allow_list_limits_which_plugins_load(site):
    listing, _ = run_plugins_json(site, MOECHAT_PLUGINS="fake,exploding")
    assert [b["name"] for b in listing["backends"]] == ["fake"]
    assert [f["plugin"] for f in listing["failed_plugins"]] == ["exploding"]
    listing, _ = run_plugins_json(site, MOECHAT_DISABLE_PLUGINS="exploding,faulty")
    assert not {"exploding", "faulty"} & {f["plugin"] for f in listing["failed_plugins"]}
    assert "fake" in {b["name"] for b in listing["backends"]}


def test_unavailable_backend_is_listed_with_its_reason(site):
    (site / "needs_gpu.py").write_text(textwrap.dedent("""
        from moechat.backends.api import Backend, Probe
        from moechat.backends.hookspecs import hookimpl

        class NeedsGpu(Backend):
            name = "needs-gpu"
            label = "Needs a GPU"
            @classmethod
            def probe(cls):
                return Probe(False, "no CUDA GPU is visible; run it on a machine with one.")

        @hookimpl
        def register_backends(register):
            register(NeedsGpu)
        """))
    info = site / "needs_gpu-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: needs_gpu\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[moechat.backends]\nneeds-gpu = needs_gpu\n")
    listing, _ = run_plugins_json(site)
    row = next(b for b in listing["backends"] if b["name"] == "needs-gpu")
    assert row["available"] is False and "no CUDA GPU" in row["reason"]


def test_suggest_backend_first_answer_wins_and_builtin_answers_last(tiny_models):
    from moechat.backends.modelinfo import inspect

    class Opinionated:
        @hookimpl
        def suggest_backend(self, model):
            return "fake" if model.model_type == "llama" else None

    plugins = get_plugin_manager(extra_plugins=[Opinionated()])
    hook = plugins.pm.hook.suggest_backend
    assert hook(model=inspect(tiny_models["llama"])) == "fake"
    assert hook(model=inspect(tiny_models["qwen3_moe"])) == "transformers"


def test_a_plugin_reads_a_model_file_format_and_the_picker_lists_its_files(tiny_models, tmp_path):
    """inspect_model: a plugin's reader answers for its files, moechat's own for Hugging Face
    folders; model_file_suffixes: the picker lists files with those endings."""
    from dataclasses import replace

    from moechat.backends.manager import BackendManager
    from moechat.backends.modelinfo import inspect
    from moechat.webui.models import find_model_folders

    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "weights.onefile").write_text("one file")
    (models / "notes.txt").write_text("not a model")

    class OneFileFormat:
        @hookimpl
        def inspect_model(self, path):
            if not path.endswith(".onefile"):
                return None
            return replace(inspect(tiny_models["llama"]), path=path, model_type="onefile")

        @hookimpl
        def model_file_suffixes(self):
            return [".onefile"]

    plugins = get_plugin_manager(extra_plugins=[OneFileFormat()])
    manager = BackendManager(plugins, tmp_path / "home")
    one_file = str(models / "sub" / "weights.onefile")
    assert manager.resolve_model(one_file).model_type == "onefile"
    assert manager.resolve_model(str(tiny_models["qwen3_moe"])).model_type == "qwen3_moe"
    suffixes = plugins.model_file_suffixes()
    assert ".onefile" in suffixes
    listed = {m.label: m.path for m in find_model_folders(models, hf_cache=False, file_suffixes=suffixes)}
    assert listed.get("sub/weights.onefile") == one_file
    assert "notes.txt" not in listed


def test_events_reach_observers_and_a_failing_observer_is_ignored(tmp_path):
    from moechat.backends.manager import BackendManager
    from moechat.backends.testing import chat, collect

    seen = []

    class Observer:
        @hookimpl
        def moechat_event(self, name, data):
            seen.append((name, data.get("backend")))

    class Broken:
        @hookimpl
        def moechat_event(self, name, data):
            raise RuntimeError("observer bug")

    manager = BackendManager(get_plugin_manager(extra_plugins=[Observer(), Broken()]), tmp_path)
    try:
        manager.load("fake", {})
        collect(manager.generate(chat("hi")))
        manager.unload()
    finally:
        manager.close()
    assert [n for n, _ in seen] == ["load_started", "load_finished", "generation_finished", "unloaded"]
    assert all(b == "fake" for _, b in seen)


def test_register_backends_is_called_with_a_register_function():
    calls = []

    class Spy:
        @hookimpl
        def register_backends(self, register):
            calls.append(register)

    get_plugin_manager(extra_plugins=[Spy()]).backends()
    assert len(calls) == 1 and callable(calls[0])
    with pytest.raises(TypeError):
        calls[0](object)
