"""Helpers for the browser tests: a real ``moechat serve`` subprocess on loopback and headless
Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MOECHAT = str(Path(sys.executable).parent / "moechat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``moechat serve`` in its own process group, logging to a file in its data dir."""

    def __init__(self, data_dir: Path, *args: str, port: int | None = None, executable: str = MOECHAT,
                 env: dict[str, str] | None = None, cwd: Path = ROOT):
        self.data_dir = data_dir
        self.executable, self.base_env, self.cwd = executable, env, cwd
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    def start(self, timeout: float = 120) -> Server:
        env = dict(self.base_env if self.base_env is not None else os.environ, GRADIO_ANALYTICS_ENABLED="False", MOECHAT_HOME=str(self.data_dir),
                   MOECHAT_NO_GPU="1", HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
        env.pop("MOECHAT_PLUGINS", None)
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.executable, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
             *self.args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(self.cwd), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moechat serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status in (200, 401):
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"moechat serve did not answer on {self.url} in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server and everything it started (its worker processes)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()


@contextmanager
def server(data_dir: Path, *args: str, port: int | None = None):
    s = Server(data_dir, *args, port=port).start()
    try:
        yield s
    finally:
        s.stop()


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def log_in(browser, url: str, user: str, password: str, timeout_ms: int):
    """A new browser context logged in to the page at ``url``: (context, page), the chat shown."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(timeout_ms)
    page = ctx.new_page()
    page.goto(url, wait_until="load")
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#chatbot")
    return ctx, page


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def doc_shot(locator, name: str) -> Path:
    """A screenshot for the docs: ``locator``'s element as NAME.png. With MOECHAT_UPDATE_DOC_SHOTS=1
    it replaces the committed docs/img/NAME.png; otherwise it goes to test-artifacts/, so a test
    run leaves the checkout as it was."""
    folder = ROOT / "docs" / "img" if os.environ.get("MOECHAT_UPDATE_DOC_SHOTS") == "1" else ARTIFACTS
    path = folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    locator.screenshot(path=str(path))
    return path


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
