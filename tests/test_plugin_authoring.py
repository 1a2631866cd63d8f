"""What a plugin author gets: the tutorial in docs/plugin-hooks.md runs as written and passes the
contract suite, the template installs and passes it, the CLI lists, installs and describes
plugins, and the host carries the duties the docs say it carries."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loguru import logger
from pydantic import field_validator

from moechat.backends import protocol
from moechat.backends.api import Backend, BackendSettings, Cancelled, Probe, SettingsInvalid
from moechat.backends.hookspecs import hookimpl
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.replies import chat, collect
from moechat.backends.worker import StopStrings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tutorial_files(doc: str) -> dict[str, str]:
    """The code blocks of docs/plugin-hooks.md whose first line is ``# file: NAME``, joined per file."""
    files: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", doc, flags=re.S):
        first, _, body = block.partition("\n")
        if first.startswith("# file: "):
            name = first.removeprefix("# file: ").strip()
            files[name] = files.get(name, "") + body
    return files


def moechat(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moechat.webui.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def run_pytest(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "error::pytest.PytestDeprecationWarning", str(path)], capture_output=True, text=True,
                          timeout=900, cwd=path if path.is_dir() else path.parent, env=dict(os.environ, **(env or {})))


# ---- the tutorial and the template --------------------------------------------------------------
def test_the_tutorial_backend_passes_the_contract_suite_as_written(tmp_path):
    files = tutorial_files((ROOT / "docs" / "plugin-hooks.md").read_text())
    assert set(files) == {"parrot.py", "test_parrot.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    env = {"MOECHAT_PLUGIN_PATHS": str(tmp_path / "parrot.py")}

    listed = moechat("settings", "parrot", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "max_reply_words (int, default 64) [minimum 1]" in listed.stdout
    assert "Most words in one reply." in listed.stdout
    assert "api_key (SecretStr, default SecretStr('')) [secret]" in listed.stdout or "[secret]" in listed.stdout

    plugins = json.loads(moechat("plugins", "--json", env=env).stdout)
    row = next(b for b in plugins["backends"] if b["name"] == "parrot")
    assert row["plugin"] == "parrot" and row["distribution"] == str(tmp_path / "parrot.py")

    done = run_pytest(tmp_path / "test_parrot.py", env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "failed" not in done.stdout and "Deprecation" not in done.stdout
    assert re.search(r"\d+ passed", done.stdout)


def test_the_template_installs_into_moechats_environment_and_passes_the_contract_suite(tmp_path):
    plugin = tmp_path / "my-plugin"
    shutil.copytree(ROOT / "docs" / "plugin-template", plugin)
    installed = moechat("plugins", "install", str(plugin), timeout=600)
    try:
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "my-backend" in installed.stdout
        listing = json.loads(moechat("plugins", "--json").stdout)
        row = next(b for b in listing["backends"] if b["name"] == "my-backend")
        assert (row["plugin"], row["distribution"], row["version"]) == ("myplugin", "moechat-myplugin", "0.1.0")
        table = moechat("plugins").stdout
        assert "[myplugin: moechat-myplugin 0.1.0] ready" in table
        done = run_pytest(plugin / "tests")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert re.search(r"\d+ passed", done.stdout) and "Deprecation" not in done.stdout
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "moechat-myplugin"],
                       capture_output=True, timeout=300)


def test_installing_something_that_is_not_there_says_so(tmp_path):
    done = moechat("plugins", "install", "--editable", str(tmp_path / "nowhere"))
    assert done.returncode != 0 and "--editable takes a plugin folder" in done.stderr


# ---- the CLI --------------------------------------------------------------------------------------
def test_plugins_lists_distribution_and_version():
    listing = json.loads(moechat("plugins", "--json").stdout)
    fake = next(b for b in listing["backends"] if b["name"] == "fake")
    assert (fake["distribution"], fake["version"]) == ("moechat-fake", "0.1.0")
    assert "[fake: moechat-fake 0.1.0] ready" in moechat("plugins").stdout


def broken_site(tmp_path: Path) -> Path:
    (tmp_path / "faulty_register.py").write_text(
        "from moechat.backends.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_backends(register):\n    raise ValueError('cannot register today')\n")
    info = tmp_path / "faulty_register-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: faulty_register\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[moechat.backends]\nfaulty = faulty_register\n")
    return tmp_path


def test_strict_fails_on_a_broken_plugin_and_on_an_allow_list_name_that_matches_nothing(tmp_path):
    site = {"PYTHONPATH": os.pathsep.join([str(broken_site(tmp_path)), os.environ.get("PYTHONPATH", "")])}
    assert moechat("plugins", env=site).returncode == 0
    strict = moechat("plugins", "--strict", env=site)
    assert strict.returncode == 1 and "BROKEN plugin faulty: register_backends raised ValueError" in strict.stdout
    typo = moechat("plugins", "--strict", env={"MOECHAT_PLUGINS": "fake,fakee"})
    assert typo.returncode == 1
    assert "MOECHAT_PLUGINS names 'fakee', which matches no installed plugin." in typo.stdout
    assert "fakee" in typo.stderr  # logged for the server too
    assert moechat("plugins", "--strict", env={"MOECHAT_PLUGINS": "fake"}).returncode == 0


def test_a_broken_register_hook_is_logged_once(tmp_path):
    code = ("from moechat.backends.plugins import get_plugin_manager\n"
            "p = get_plugin_manager()\n"
            "for _ in range(3): p.backends(); p.listing()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(broken_site(tmp_path)), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("plugin faulty failed to register its backends") == 1


def test_settings_prints_types_defaults_and_descriptions():
    out = moechat("settings", "fake")
    assert out.returncode == 0, out.stderr
    assert "delay_s (float, default 0.0) [minimum 0]" in out.stdout
    assert "model (" not in out.stdout   # the fake reads no model folder
    assert "Seconds to wait before each token." in out.stdout
    rows = json.loads(moechat("settings", "fake", "--json").stdout)["settings"]
    assert {"name": "context_length", "type": "int", "default": 4096} .items() <= next(
        r for r in rows if r["name"] == "context_length").items()
    missing = moechat("settings", "no-such-backend")
    assert missing.returncode == 1 and "No backend named 'no-such-backend'. Installed backends:" in missing.stderr


def test_a_single_file_plugin_that_fails_is_reported_with_its_path(tmp_path):
    bad = tmp_path / "half_written.py"
    bad.write_text("def oops(:\n")
    listing = json.loads(moechat("plugins", "--json", env={"MOECHAT_PLUGIN_PATHS": str(bad)}).stdout)
    failure = next(f for f in listing["failed_plugins"] if f["plugin"] == "half_written")
    assert str(bad) in failure["error"] and "SyntaxError" in failure["error"]
    assert "fake" in {b["name"] for b in listing["backends"]}


# ---- the host's duties ----------------------------------------------------------------------------
def test_stop_strings_are_cut_across_chunks():
    stops = StopStrings(["END", "\n\n"])
    out, hit = [], False
    for piece in ["The sea", " is calm E", "N", "D and more"]:
        text, hit = stops.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "The sea is calm " and hit
    loose = StopStrings(["END"])
    assert loose.feed("almost E") == ("almost ", False)
    assert loose.feed("x") == ("Ex", False) and loose.flush() == ""


@pytest.fixture
def fake_manager(tmp_path):
    mgr = BackendManager(get_plugin_manager(), tmp_path)
    yield mgr
    mgr.close()


def test_the_host_applies_stop_strings_and_refuses_long_prompts(fake_manager):
    fake_manager.load("fake", {"context_length": 8})
    text, last = collect(fake_manager.generate(chat("one two three", stop=["thr"])))
    assert text == "one two " and last.finish_reason == "stop"
    assert last.usage["completion_tokens"] == 3   # the tokens generated, though their text was cut
    _, last = collect(fake_manager.generate(chat("a b c d e f g h i")))
    assert last.code == "context_length_exceeded"
    assert last.error == ("The prompt is 9 tokens but this model takes at most 8 tokens, prompt and reply together. "
                          "Shorten the chat or start a new one.")


def test_a_failed_load_is_logged(fake_manager):
    lines: list[str] = []
    sink = logger.add(lines.append, level="ERROR", format="{message}")
    try:
        with pytest.raises(Exception, match="no weights here"):
            fake_manager.load("fake", {"fail_load": "no weights here"})
    finally:
        logger.remove(sink)
    assert any("load of fake failed: no weights here" in line for line in lines)


class Counted(Backend):
    name = "counted"
    label = "Counts its probes"
    needs_model = False
    probes = 0

    class Settings(BackendSettings):
        level: int = 1
        name: str = ""

        @field_validator("name")
        @classmethod
        def no_spaces(cls, value):
            if " " in value:
                raise ValueError("name takes no spaces: write it as one word.")
            return value

    @classmethod
    def probe(cls, settings=None):
        cls.probes += 1
        return Probe(True)

    @classmethod
    def check(cls, settings, model):
        if settings.level > 3:
            raise SettingsInvalid("level above 3 is not supported: lower level.")


class RegistersCounted:
    @hookimpl
    def register_backends(self, register):
        register(Counted)


def test_check_validates_once_and_reuses_its_probe(tmp_path):
    mgr = BackendManager(get_plugin_manager(extra_plugins=[RegistersCounted()]), tmp_path)
    first = mgr.check("counted", {"level": 2})
    again = mgr.check("counted", {"level": 2})
    assert first.probe.available and again.refusal() is None and Counted.probes == 1
    rows = [mgr.listing() for _ in range(3)]   # GET /v1/models and the page's list: probed without settings
    assert next(r for r in rows[-1] if r["name"] == "counted")["available"] and Counted.probes == 2
    with pytest.raises(SettingsInvalid, match="level above 3"):
        mgr.check("counted", {"level": 4})
    with pytest.raises(SettingsInvalid, match="level: Input should be a valid integer"):
        mgr.check("counted", {"level": "high"})
    with pytest.raises(SettingsInvalid) as refused:
        mgr.check("counted", {"name": "two words"})
    assert str(refused.value) == "Some settings are not valid. name: name takes no spaces: write it as one word."


def test_a_cancelled_load_is_known_by_its_type(fake_manager):
    import threading

    outcome: list[BaseException] = []

    def load():
        try:
            fake_manager.load("fake", {"delay_s": 2})
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=load)
    t.start()
    while fake_manager.state.status != "loading":
        t.join(0.05)
    fake_manager.cancel_load()
    t.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)


# ---- the protocol ---------------------------------------------------------------------------------
def test_every_protocol_message_survives_the_wire():
    samples = [protocol.Load({"model": "x"}), protocol.Generate("g1", {"prompt": "hi"}), protocol.Cancel("g1"),
               protocol.StatsRequest(), protocol.PerplexityRequest("text"), protocol.Unload(),
               protocol.LoadProgress("Reading", 1, 2, "files"), protocol.Loaded({"model_name": "m"}),
               protocol.LoadFailed("no", "invalid_settings"), protocol.ChunkOut("g1", "a", 1),
               protocol.Done("g1", "stop", {"completion_tokens": 1}), protocol.StatsReply({"a": 1}),
               protocol.PerplexityReply(2.0), protocol.Unloaded()]
    assert {type(m) for m in samples} == set(protocol.TO_WORKER + protocol.TO_HOST)
    assert [protocol.from_wire(protocol.to_wire(m)) for m in samples] == samples
    with pytest.raises(protocol.ProtocolError, match="install the same moechat version"):
        protocol.from_wire({"type": "Teleport", "where": "moon"})


def test_the_plugin_docs_name_every_type_and_backend_member():
    doc = (ROOT / "docs" / "plugin-hooks.md").read_text()
    import moechat.backends as public
    types = [n for n in public.__all__ if n not in ("hookimpl", "probe_modules")]
    members = [m for m in vars(Backend) if not m.startswith("_")]
    assert [n for n in types if f"`{n}" not in doc] == []
    assert [m for m in members if f"`{m}" not in doc] == []
    from moechat.backends.manager import PROBE_CACHE_S
    assert f"Its answer is reused for {PROBE_CACHE_S:.0f} s" in doc


DEAF = '''
import time
from moechat.backends.api import Backend, Chunk
from moechat.backends.hookspecs import hookimpl

class Deaf(Backend):
    name = "deaf"
    label = "Never checks should_stop"
    needs_model = False

    def load(self, settings, progress):
        return {"model_name": "deaf"}

    def generate(self, request, should_stop):
        for i in range(200):
            time.sleep(0.01)
            yield Chunk(text=" word", tokens=1, prompt_tokens=1 if i == 0 else None)
        yield Chunk(finish_reason="length")

@hookimpl
def register_backends(register):
    register(Deaf)
'''


def test_stop_ends_a_reply_even_when_the_backend_never_checks(tmp_path, monkeypatch):
    """Also a single-file plugin (MOECHAT_PLUGIN_PATHS) run in a real worker process."""
    from moechat.backends.replies import stop_after

    (tmp_path / "deaf_plugin.py").write_text(DEAF)
    monkeypatch.setenv("MOECHAT_PLUGIN_PATHS", str(tmp_path / "deaf_plugin.py"))
    mgr = BackendManager(get_plugin_manager(), tmp_path)
    try:
        mgr.load("deaf", {})
        seen, last = stop_after(mgr.generate(chat("hi")), 2)
        assert last.finish_reason == "cancelled" and last.usage["completion_tokens"] < 200
        assert collect(mgr.generate(chat("hi", max_new_tokens=3)))[1].error is None
    finally:
        mgr.close()
