"""The backend contract suite. Every backend, built-in or third-party, passes it.

Plugin authors subclass it in their own tests::

    from moechat.backends.testing import BackendContract

    class TestMyBackend(BackendContract):
        backend = "my-backend"            # the name your Backend class has (``name``)
        settings = {"some_setting": 1}    # load settings; "model" defaults to a tiny demo model

It loads the backend through the real BackendManager, in a real worker process, and checks
what the app relies on: cheap listing, a typed and documented settings schema, streaming that
ends with a finish reason, Stop, max_new_tokens, seeds, stop strings, continuing the last
assistant message, the stats contract, prompts longer than the context, a refused setting that
keeps the loaded model, secrets (``SecretStr`` settings) never echoed, and that unloading ends
the worker. Each failure says what is wrong and what to change.
"""

from __future__ import annotations

import json
import secrets as _secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr

from moechat.backends.api import BackendError, GenerateRequest, Message, SamplingParams, secret_fields
from moechat.backends.hookspecs import hookimpl
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


class EventLog:
    """A plugin that records every ``moechat_event`` (to check no secret reaches observers)."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    @hookimpl
    def moechat_event(self, name, data):
        self.events.append((name, data))


class BackendContract:
    backend: ClassVar[str]
    settings: ClassVar[dict[str, Any]] = {}
    uses_model_folder: ClassVar[bool] = True
    # A prompt that makes the backend write many tokens, so Stop lands mid-stream.
    long_prompt: ClassVar[str] = "Write a long story about the sea, " * 4
    # Settings (added to ``settings``) the backend must refuse before unloading what is loaded:
    # by default a setting no backend has; name one your ``check`` or validators refuse.
    refused_settings: ClassVar[dict[str, Any]] = {"not_a_setting_of_this_backend": 1}

    @pytest.fixture(scope="class")
    @classmethod
    def manager(cls, contract_model_dir, tmp_path_factory):
        cls.event_log = EventLog()
        mgr = BackendManager(get_plugin_manager(extra_plugins=[cls.event_log]),
                             tmp_path_factory.mktemp("contract-home"))
        settings = dict(cls.settings)
        if cls.uses_model_folder:
            settings.setdefault("model", str(contract_model_dir))
        for name in secret_fields(mgr.backends()[cls.backend].cls.Settings):
            settings.setdefault(name, f"contract-secret-{_secrets.token_hex(6)}")
        cls.loaded_settings = settings
        mgr.load(cls.backend, settings)
        yield mgr
        mgr.close()

    def secret_values(self, manager) -> list[str]:
        """The text of every ``SecretStr`` setting the suite loaded with."""
        names = secret_fields(manager.backends()[self.backend].cls.Settings)
        values = [self.loaded_settings.get(n) for n in names]
        return [v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in values if v]

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
        assert out.returncode == 0, f"listing the {self.backend} backend failed:\n{out.stderr}"
        heavy = json.loads(out.stdout.strip().splitlines()[-1])
        assert heavy == [], (f"listing imports {heavy}: import them inside load() (or generate()), not at the "
                             "top of your plugin module, so `moechat plugins` and the page stay fast.")

    def test_settings_schema_is_documented(self):
        cls = get_plugin_manager().backend(self.backend).cls
        schema = cls.Settings.model_json_schema()
        undocumented = [k for k, v in schema["properties"].items() if not v.get("description")]
        assert undocumented == [], (f"settings without a description: {undocumented}. Declare each as "
                                    "`name: type = Field(default, description=\"...\")`: the description is the "
                                    "help text of the page's form and of `moechat settings`.")
        assert cls.label, "the Backend class has no `label`: set one, it is the backend's name in the page's dropdown."

    def test_probe_says_available_or_why(self):
        probe = get_plugin_manager().backend(self.backend).probe()
        assert probe.available or probe.reason.strip(), (
            "probe() said unavailable without a reason: return Probe(False, \"what is missing and how to fix it\").")

    # ---- through the worker -------------------------------------------------------------------
    def test_stream_ends_with_a_finish_reason_and_usage(self, manager):
        text, last = collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=8)))
        assert last.kind == "done" and last.error is None, f"generation failed: {last.error}"
        assert last.finish_reason in ("stop", "length"), (
            f"the stream ended with finish_reason={last.finish_reason!r}: the last Chunk of generate() must carry "
            "finish_reason 'stop' (the model ended) or 'length' (max_new_tokens reached).")
        usage = last.usage
        assert usage["completion_tokens"] >= 1, "no generated tokens were counted: set Chunk.tokens on each chunk."
        assert (usage["prompt_tokens"] or 0) >= 1, (
            "the prompt's token count is missing: set Chunk.prompt_tokens on the first chunk (or answer "
            "count_prompt_tokens()).")
        assert text.strip(), "the reply has no text: yield Chunk(text=...) for each piece of the reply."

    def test_max_new_tokens_is_respected(self, manager):
        _, last = collect(manager.generate(chat(self.long_prompt, temperature=0, max_new_tokens=3)))
        assert last.usage["completion_tokens"] <= 3, (
            f"{last.usage['completion_tokens']} tokens for max_new_tokens=3: stop at "
            "request.sampling.max_new_tokens and end with finish_reason='length'.")

    def test_stop_mid_stream_then_the_next_request_works(self, manager):
        _, last = stop_after(manager.generate(chat(self.long_prompt, temperature=0, max_new_tokens=400)), 2)
        assert last.finish_reason == "cancelled", (
            f"after Stop the stream ended with {last.finish_reason!r}: check should_stop() between tokens and end "
            "with Chunk(finish_reason='cancelled') when it is true.")
        assert last.usage["completion_tokens"] < 400, "Stop did not stop the generation early: check should_stop()."
        _, after = collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=4)))
        assert after.finish_reason in ("stop", "length") and after.error is None, (
            f"the request after a Stop failed ({after.error}): leave the backend ready for the next request "
            "when generate() ends early.")

    def test_greedy_is_repeatable_and_seeds_repeat(self, manager):
        greedy = [collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=6)))[0]
                  for _ in range(2)]
        assert greedy[0] == greedy[1], f"temperature=0 gave two replies {greedy}: decode greedily at temperature 0."
        seeded = [collect(manager.generate(chat("Hello there", temperature=1.0, seed=7, max_new_tokens=6)))[0]
                  for _ in range(2)]
        assert seeded[0] == seeded[1], f"seed=7 gave two replies {seeded}: seed your sampler with request.sampling.seed."

    def test_stop_strings_end_the_reply_before_them(self, manager):
        text, _ = collect(manager.generate(chat(self.long_prompt, temperature=0, max_new_tokens=16)))
        middle = len(text) // 2
        stop = text[middle:middle + 2]
        if len(text) < 4 or not stop.strip():
            pytest.skip("the reply is too short to pick a stop string from")
        cut, last = collect(manager.generate(chat(self.long_prompt, temperature=0, max_new_tokens=16, stop=[stop])))
        assert last.error is None, f"generation with a stop string failed: {last.error}"
        assert cut == text[:text.find(stop)] and last.finish_reason == "stop", (
            f"with stop=[{stop!r}] the reply was {cut!r} ({last.finish_reason}), expected {text[:text.find(stop)]!r} "
            "(stop). The host cuts the reply before a stop string; a backend that stops early itself must "
            "still stream the same text up to it.")

    def test_continue_last_continues_the_assistant_message(self, manager):
        partial = "Once upon a time, in a harbour town,"
        plain = GenerateRequest(messages=[Message(role="user", content="Tell me a story")],
                                sampling=SamplingParams(temperature=0, max_new_tokens=6))
        cont = GenerateRequest(messages=[*plain.messages, Message(role="assistant", content=partial)],
                               sampling=plain.sampling, continue_last=True)
        _, base = collect(manager.generate(plain))
        text, last = collect(manager.generate(cont))
        assert last.error is None and last.finish_reason in ("stop", "length"), (
            f"continue_last failed: {last.error or last.finish_reason}")
        assert last.usage["prompt_tokens"] > base.usage["prompt_tokens"], (
            "with continue_last=True the last assistant message must be part of the prompt (left open, with no "
            "end-of-turn after it), so the prompt is longer than without it.")
        assert not text.startswith(partial), (
            "with continue_last=True stream only the continuation, not the assistant message again.")

    def test_stats_contract(self, manager):
        collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=6)))
        stats = manager.stats()
        assert stats["status"] == "ready", f"the backend is not ready after generating: {stats.get('error')}"
        missing = [key for key in STATS_KEYS if key not in stats["last"]]
        assert missing == [], f"the last generation's stats lack {missing}"
        assert stats["last"]["ttft_s"] > 0, "no time to first token: yield a Chunk with tokens >= 1 for each token."
        assert stats["load"]["load_time_s"] > 0
        assert stats["backend_stats"]["worker_rss_bytes"] > 0, f"stats() failed: {stats['backend_stats']}"
        assert "stats_error" not in stats["backend_stats"], (
            f"stats() raised: {stats['backend_stats']['stats_error']}; return a dict of numbers.")
        for gpu in stats["backend_stats"].get("gpus", []):
            assert gpu["total_bytes"] >= gpu["used_bytes"] >= 0

    def test_prompt_longer_than_the_context_gets_a_sentence(self, manager):
        context = manager.state.info.get("context_length")
        if not context:
            pytest.skip("the backend does not report a context length")
        _, last = collect(manager.generate(chat("word " * (context + 10), max_new_tokens=4)))
        assert last.finish_reason == "error" and "at most" in (last.error or "") and str(context) in last.error, (
            f"a prompt longer than the context ({context} tokens) ended with {last.finish_reason!r}: "
            f"{last.error!r}. Answer count_prompt_tokens() so the host refuses it, or raise "
            "PromptTooLong(\"The prompt is N tokens but this model takes at most C ...\") from generate().")
        assert last.code == "context_length_exceeded", (
            f"the error's code is {last.code!r}: raise PromptTooLong (not a plain BackendError), so the API "
            "answers it as context_length_exceeded.")

    def test_a_refused_setting_keeps_the_loaded_model(self, manager):
        worker = manager._worker
        with pytest.raises(BackendError) as refused:
            manager.load(self.backend, dict(self.loaded_settings, **self.refused_settings))
        assert manager.state.ready and manager._worker is worker and worker.alive, (
            f"loading with {self.refused_settings} unloaded the model before it was refused ({refused.value}). "
            "Refuse settings before load(): with Field bounds or a pydantic validator on your Settings, or in "
            "your Backend's classmethod check(settings, model).")
        for secret in self.secret_values(manager):
            assert secret not in str(refused.value), "the refusal's message shows a secret setting's value"
        _, last = collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=2)))
        assert last.error is None, f"the model kept after a refused load does not answer: {last.error}"

    def test_secrets_are_not_echoed(self, manager):
        secrets_ = self.secret_values(manager)
        if not secrets_:
            pytest.skip("the backend has no SecretStr settings")
        collect(manager.generate(chat("Hello there", temperature=0, max_new_tokens=2)))
        shown = {"stats": manager.stats(), "load info": manager.state.info, "settings": manager.state.settings,
                 "events": self.event_log.events}
        for where, value in shown.items():
            text = json.dumps(value, default=str)
            assert not any(s in text for s in secrets_), (
                f"a secret setting's value shows in the {where}: keep SecretStr values out of load()'s return, "
                "stats() and error messages (use settings.api_key.get_secret_value() only where you send it).")

    def test_unload_ends_the_worker(self, manager):
        worker = manager._worker
        pid = worker.pid
        settings = dict(manager.state.settings)
        manager.unload()
        assert worker.proc.poll() is not None, f"worker {pid} still runs after unload: return from unload() promptly."
        assert manager.stats()["memory"]["worker_exited"] is True
        _, last = collect(manager.generate(chat("Hello", max_new_tokens=2)))
        assert last.finish_reason == "error" and "No model is loaded" in last.error
        manager.load(self.backend, settings)  # and it loads again
        assert manager.state.ready, f"loading again after unload failed: {manager.state.error}"


__all__ = ["BackendContract", "BackendError", "chat", "collect", "contract_model_dir"]
