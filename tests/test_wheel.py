"""moechat as a person installs it: built as a wheel, installed into a fresh virtual environment,
run from a folder that is not the checkout. Nothing may depend on the source tree.

The fresh environment takes its third-party packages (torch, gradio, ...) from the test's own
environment through a path file, so the test installs nothing from the network; moechat and the
plugins come only from the wheels built here (the test's environment has them installed editable,
and an editable install's import hook is not active in the fresh one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from browser_helpers import Server
from test_api import wait_for_status

ROOT = Path(__file__).resolve().parent.parent
BUILT_IN = {"transformers", "transformers-bnb4", "moe-offload", "vllm", "vllm-offload"}

pytestmark = pytest.mark.slow


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the moechat wheel and the wheels of the plugins in plugins/ installed; its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheels = tmp / "wheels"
    # every plugin in plugins/, as `make install` installs them (their entry points are visible here)
    for project in (ROOT, *sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))):
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(wheels), str(project)], cwd=tmp)
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the test environment's packages, after the fresh venv's own (so the wheels win)
    Path(site, "zz-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         *map(str, sorted(wheels.glob("*.whl")))], cwd=tmp)
    return venv / "bin"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOECHAT_PLUGINS", "MOECHAT_DISABLE_PLUGINS")}
    return dict(env, MOECHAT_HOME=str(home), GRADIO_ANALYTICS_ENABLED="False", MOECHAT_NO_GPU="1",
                HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")


def test_the_wheel_installs_one_top_level_name(installed):
    site = Path(run([str(installed / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    names = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))} - {"__pycache__"}
    assert "backends" not in names and "webui" not in names, names
    assert {"moechat", "moechat_fake", "moechat_remote", "moechat_llamacpp"} <= names
    where = run([str(installed / "python"), "-c", "import moechat.backends.api as a, moechat.webui.cli as c; "
                 "print(a.__file__); print(c.__file__)"], cwd="/").stdout.split()
    assert all(w.startswith(str(site)) for w in where), where


def test_installed_plugins_lists_every_built_in_backend(installed, tmp_path):
    out = run([str(installed / "moechat"), "plugins", "--json"], cwd=tmp_path, env=clean_env(tmp_path))
    listing = json.loads(out.stdout)
    names = {b["name"] for b in listing["backends"]}
    assert BUILT_IN | {"fake", "remote", "llama.cpp"} <= names, names
    assert listing["failed_plugins"] == []


def test_installed_server_answers_a_chat(installed, tmp_path):
    server = Server(tmp_path, "--backend", "fake", executable=str(installed / "moechat"),
                    env=clean_env(tmp_path), cwd=tmp_path).start()
    try:
        models = wait_for_status(server, "ready", "failed", key=None)
        assert models["status"] == "ready", server.tail()
        body = json.dumps({"model": models["data"][0]["id"], "messages": [{"role": "user", "content": "hello from a wheel"}],
                           "max_tokens": 16}).encode()
        req = urllib.request.Request(server.url + "v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        assert "hello from a wheel" in reply["choices"][0]["message"]["content"]
    finally:
        server.stop()
    # the worker ran from the wheel too: the server's log names no checkout path
    assert str(ROOT) not in server.tail(400)


def test_installed_bench_measures_and_writes_the_schema(installed, tmp_path):
    """`moechat bench` from the wheel: its bandwidth probe is part of the package, not a checkout path."""
    out = tmp_path / "fake.json"
    proc = run([str(installed / "moechat"), "bench", "--backend", "fake", "--model", "synthetic:tiny", "--no-progress",
                "--prompt-tokens", "4", "--gen-tokens", "2", "--repeat", "1", "--bandwidth-mb", "8", "--json", str(out)],
               cwd=tmp_path, env=clean_env(tmp_path))
    assert "fake on synthetic:tiny" in proc.stdout
    check = ("import json, sys; from moechat.backends import benchmark; r = benchmark.read(sys.argv[1]); "
             "print(json.dumps([r.run.kind, r.run.machine.bandwidth.get('cpu_copy_gb_s'), benchmark.__file__]))")
    kind, copy_rate, where = json.loads(run([str(installed / "python"), "-c", check, str(out)], cwd=tmp_path,
                                            env=clean_env(tmp_path)).stdout)
    assert kind == "product" and copy_rate > 0 and str(ROOT) not in where
