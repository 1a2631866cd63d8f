"""The Compare view in a real headless Chromium against a real ``moechat serve`` on loopback:
three presets (transformers and moe-offload on the tiny demo model, the fake plugin) run one
after another, with progress, results side by side, the first difference marked and export;
a failing preset and Cancel mid-run; the backend loaded before is back afterwards.

Presets are saved with ``moechat compare --save`` (the same database the server reads), and one
from the page's model panel. The test writes docs/img/compare.png for docs/web-ui.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("playwright")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from browser_helpers import MOECHAT, Server, chromium, doc_shot, shot  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TIMEOUT_MS = int(os.environ.get("MOECHAT_BROWSER_TIMEOUT_MS", "240000"))
FAIL = "This preset is set to fail."
LONG = " ".join(f"word{i}" for i in range(1, 41))


@pytest.fixture(scope="module")
def server(tmp_path_factory, contract_model_dir):
    data = tmp_path_factory.mktemp("compare")
    shutil.copytree(contract_model_dir, data / "demo-model")
    env = dict(os.environ, MOECHAT_HOME=str(data), MOECHAT_NO_GPU="1", HF_HUB_OFFLINE="1")
    cache = str(data / "moe-offload-cache")
    for args in (["tiny-transformers", "--backend", "transformers", "--model", "", "--set", "device=cpu"],
                 # bf16/fp32 experts, no int4: the same weights as transformers, so greedy output agrees
                 ["tiny-moe-offload", "--backend", "moe-offload", "--model", "", "--set", "device=cpu",
                  "--set", "expert_format=none", "--set", f"cache_dir={cache}"],
                 ["broken", "--backend", "fake", "--set", f"fail_load={FAIL}"],
                 ["slow", "--backend", "fake", "--set", "delay_s=0.3"]):
        subprocess.run([MOECHAT, "compare", "--save", *args], env=env, check=True, capture_output=True)
    s = Server(data, "--no-load").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):
    with chromium() as browser:
        ctx = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
        ctx.set_default_timeout(TIMEOUT_MS)
        p = ctx.new_page()
        p.goto(server.url, wait_until="load")
        p.wait_for_selector("#load")
        yield p
        ctx.close()


def choose(page, elem_id: str, option_text: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option_text).first.click()


def choose_presets(page, *names: str) -> None:
    box = page.locator("#compare-presets input")
    for name in names:
        box.click()
        page.get_by_role("option", name=name).first.click()
    page.locator("#compare-prompt textarea").click()     # close the list


def clear_presets(page) -> None:
    while page.locator("#compare-presets .token-remove").count():
        page.locator("#compare-presets .token-remove").first.click()


def card(page, preset: str):
    return page.locator(f'#compare-results .compare-entry[data-preset="{preset}"]')


def wait_text(page, selector: str, text: str) -> None:
    page.locator(selector).filter(has_text=text).first.wait_for()


def load_fake(page) -> None:
    """What is loaded before a comparison: the fake backend, from the model panel."""
    choose(page, "backend", "Fake: echoes your message (for tests)")
    page.click("#load")
    wait_text(page, "#model-status", "Loaded fake-echo with fake")


def open_compare(page) -> None:
    if page.locator("#compare-run").count() == 0 or not page.locator("#compare-run").is_visible():
        page.locator("#compare").get_by_text("Compare backends on one prompt").first.click()
    page.locator("#compare-run").wait_for()


def export(page, fmt: str, folder: Path) -> str:
    """Press Export (``md`` or ``json``), download the file it offers, and return its text."""
    page.click(f"#compare-export-{fmt}")
    link = page.locator(f'#compare-export-file a[href*=".{fmt}"]').first
    link.wait_for()
    with page.expect_download() as dl:
        link.click()
    dl.value.save_as(folder / f"run.{fmt}")
    return (folder / f"run.{fmt}").read_text()


def test_three_backends_side_by_side_with_progress_first_difference_and_export(page, tmp_path):
    load_fake(page)
    open_compare(page)
    # a preset from the model panel: the fake backend chosen above
    page.locator("#compare-preset-name input").fill("echo")
    page.click("#compare-save-preset")
    wait_text(page, "#compare-preset-note", "Saved the preset echo (fake).")

    choose_presets(page, "tiny-transformers", "tiny-moe-offload", "echo")
    page.locator("#compare-prompt textarea").fill("Hello! How are you today?")
    page.locator("#compare-max-tokens input").fill("8")
    page.click("#compare-run")
    # progress names the entry being worked on, and results arrive as they come
    wait_text(page, "#compare-progress", "Entry 1 of 3")
    wait_text(page, "#compare-progress", "Entry 2 of 3")
    assert card(page, "tiny-transformers").get_attribute("data-status") == "done"
    assert card(page, "echo").get_attribute("data-status") == "waiting"
    wait_text(page, "#compare-progress", "Comparison finished.")
    wait_text(page, "#compare-progress", "Loaded the fake backend loaded before the comparison again.")
    assert [card(page, p).get_attribute("data-status") for p in ("tiny-transformers", "tiny-moe-offload", "echo")] \
        == ["done", "done", "done"]

    tf, moe, echo = (card(page, p).inner_text() for p in ("tiny-transformers", "tiny-moe-offload", "echo"))
    assert "first difference\treference" in tf
    assert "first difference\tsame as tiny-transformers" in moe       # same weights, greedy: same text
    assert "first difference\tdiffers from tiny-transformers at token 0" in echo
    assert card(page, "echo").locator("mark.first-diff").inner_text() == "Hello! How are you today?"
    assert card(page, "tiny-moe-offload").locator("mark.first-diff").count() == 0
    for text in (tf, moe):
        assert "decode tok/s" in text and "load time" in text and "host peak (worker)" in text
    assert "output self-check\tFAILED: likely garbage" in tf         # random weights
    assert "expert-cache hit rate" in moe and "output self-check\tnot checked" in echo
    box = page.locator("#compare-results .compare-entry").all()
    assert len(box) == 3 and box[0].bounding_box()["y"] == box[2].bounding_box()["y"]   # side by side
    shot(page, "compare")
    doc_shot(page.locator("#compare"), "compare")

    # the backend loaded before is back
    wait_text(page, "#model-status", "Loaded fake-echo with fake")

    data = json.loads(export(page, "json", tmp_path))
    assert [e["preset"] for e in data["entries"]] == ["tiny-transformers", "tiny-moe-offload", "echo"]
    assert data["entries"][2]["first_diff"] == 0 and data["entries"][1]["same_as_reference"] is True
    assert data["commit"]["git_commit"] and data["machine"]["cpu"]
    md = export(page, "md", tmp_path)
    assert "| first difference | reference | same as tiny-transformers | differs from tiny-transformers at token 0 |" in md


def test_a_failing_preset_and_cancel_mid_run_then_the_previous_backend_is_back(page):
    open_compare(page)
    clear_presets(page)
    choose_presets(page, "broken", "slow", "tiny-transformers")
    page.locator("#compare-prompt textarea").fill(LONG)
    page.locator("#compare-max-tokens input").fill("64")
    page.click("#compare-run")
    wait_text(page, "#compare-progress", "Entry 2 of 3: Generating with slow")
    card(page, "slow").locator(".compare-text").filter(has_text="word3").wait_for()
    page.click("#compare-cancel")
    wait_text(page, "#compare-progress", "Comparison cancelled.")
    shot(page, "compare-cancelled")
    assert card(page, "broken").get_attribute("data-status") == "failed"
    assert f"Load failed: {FAIL}" in card(page, "broken").inner_text()
    assert card(page, "slow").get_attribute("data-status") == "cancelled"
    slow = card(page, "slow").locator(".compare-text").inner_text()
    assert slow.startswith("word1 word2 word3") and "word40" not in slow     # cut, what was written kept
    assert card(page, "tiny-transformers").get_attribute("data-status") == "cancelled"
    assert "Cancelled before it started." in card(page, "tiny-transformers").inner_text()
    wait_text(page, "#compare-progress", "Loaded the fake backend loaded before the comparison again.")
    wait_text(page, "#model-status", "Loaded fake-echo with fake")
