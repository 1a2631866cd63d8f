"""The backend contract suite. Every backend, built-in or third-party, passes it.

Plugin authors subclass it in their own tests::

    from moechat.backends.testing import BackendContract

    class TestMyBackend(BackendContract):
        backend = "my-backend"            # the name your plugin registers
        settings = {"some_setting": 1}    # load settings; "model" defaults to a tiny demo model

It loads the backend through the real BackendManager, in a real worker process, and checks
what the app relies on: cheap listing, a typed and documented settings schema, streaming that
ends with a finish reason, Stop, max_new_tokens, seeds, the stats contract, prompts longer
than the context, and that unloading ends the worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from moechat.backends.api import BackendError
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager
from moechat.backends.replies import chat, collect, stop_after  # noqa: F401  (chat, collect: for plugin authors' tests)

HEAVY_MODULES = ("torch", "transformers", "vllm", "bitsandbytes", "gradio")
STATS_KEYS = ("ttft_s", "prefill_tok_s", "decode_tok_s", "prompt_tokens", "completion_tokens")


@pytest.fixture(scope="session")
def contract_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-Next model (random weights, local tokenizer) shared by the whole session."""
    from moechat.backends.demo import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("contract-model") / "tiny-qwen3-next", "qwen3_next", seed=0)


class BackendContract:
    backend: ClassVar[str]
    settings: ClassVar[dict[str, Any]] = {}
    uses_model_folder: ClassVar[bool] = True
    # A prompt that makes the backend write many tokens, so Stop lands mid-stream.
    long_prompt: ClassVar[str] = "Write a long story about the sea, " * 4

    @pytest.fixture(scope="class")
    def manager(self, contract_model_dir, tmp_path_factory):
        mgr = BackendManager(get_plugin_manager(), tmp_path_factory.mktemp("contract-home"))
        settings = dict(self.settings)
        if self.uses_model_folder:
            settings.setdefault("model", str(contract_model_dir))
        mgr.load(self.backend, settings)
        yield mgr
        mgr.close()

    # ---- in the app process ---------------------------------------------------------------
    def test_listing_imports_nothing_heavy(self):
        code = (
            "import json, sys\n"
            "from moechat.backends.plugins import get_plugin_manager\n"
            f"entry = get_plugin_manager().backend({self.backend!r})\n"
            "entry.probe(); entry.cls.Settings.model_json_schema()\n"
            f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == []

    def test_settings_schema_is_documented(self):
        cls = get_plugin_manager().backend(self.backend).cls
        schema = cls.Settings.model_json_schema()
        undocumented = [k for k, v in schema["properties"].items() if not v.get("description")]
        assert undocumented == [], f"settings without a description: {undocumented}"
        assert cls.label, "a backend needs a label for the dropdown"

    def test_probe_says_available_or_why(self):
        probe = get_plugin_manager().backend(self.backend).probe()
        assert probe.available or probe.reason.strip()

    # ---- through the worker -------------------------------------------------------------------
    def test_stream_ends_with_a_finish_reason_and_usage(self, manager):
        text, last = collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=8)))
        assert last.kind == "done" and last.error is None
        assert last.finish_reason in ("stop", "length")
        usage = last.usage
        assert usage["completion_tokens"] >= 1
        assert usage["prompt_tokens"] >= 1
        assert text.strip(), "the reply has no text"

    def test_max_new_tokens_is_respected(self, manager):
        _, last = collect(manager.generate(chat(self.long_prompt, temperature=0, max_new_tokens=3)))
        assert last.usage["completion_tokens"] <= 3

    def test_stop_mid_stream_then_the_next_request_works(self, manager):
        _, last = stop_after(manager.generate(chat(self.long_prompt, temperature=0, max_new_tokens=400)), 2)
        assert last.finish_reason == "cancelled"
        assert last.usage["completion_tokens"] < 400
        _, after = collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=4)))
        assert after.finish_reason in ("stop", "length") and after.error is None

    def test_greedy_is_repeatable_and_seeds_repeat(self, manager):
        greedy = [collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=6)))[0]
                  for _ in range(2)]
        assert greedy[0] == greedy[1]
        seeded = [collect(manager.generate(chat("Hello there", temperature=1.0, seed=7, max_new_tokens=6)))[0]
                  for _ in range(2)]
        assert seeded[0] == seeded[1]

    def test_stats_contract(self, manager):
        collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=6)))
        stats = manager.stats()
        assert stats["status"] == "ready"
        for key in STATS_KEYS:
            assert key in stats["last"], f"stats lack {key}"
        assert stats["last"]["ttft_s"] > 0
        assert stats["load"]["load_time_s"] > 0
        assert stats["backend_stats"]["worker_rss_bytes"] > 0
        for gpu in stats["backend_stats"].get("gpus", []):
            assert gpu["total_bytes"] >= gpu["used_bytes"] >= 0

    def test_prompt_longer_than_the_context_gets_a_sentence(self, manager):
        context = manager.state.info.get("context_length")
        if not context:
            pytest.skip("the backend does not report a context length")
        _, last = collect(manager.generate(chat("word " * (context + 10), max_new_tokens=4)))
        assert last.finish_reason == "error"
        assert "at most" in last.error and str(context) in last.error

    def test_unload_ends_the_worker(self, manager):
        worker = manager._worker
        pid = worker.pid
        settings = dict(manager.state.settings)
        manager.unload()
        assert worker.proc.poll() is not None, f"worker {pid} still runs after unload"
        assert manager.stats()["memory"]["worker_exited"] is True
        _, last = collect(manager.generate(chat("Hello", max_new_tokens=2)))
        assert last.finish_reason == "error" and "No model is loaded" in last.error
        manager.load(self.backend, settings)  # and it loads again
        assert manager.state.ready


__all__ = ["BackendContract", "BackendError", "chat", "collect", "contract_model_dir"]
