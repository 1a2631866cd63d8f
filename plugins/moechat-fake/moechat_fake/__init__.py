"""A fake backend: no model, deterministic replies. See README.md."""

from __future__ import annotations

import os
import signal
import sys
import time

from pydantic import Field

from moechat.backends.api import Backend, BackendError, BackendSettings, Chunk, Progress
from moechat.backends.hookspecs import hookimpl


class FakeSettings(BackendSettings):
    delay_s: float = Field(0.0, ge=0, description="Seconds to wait before each token.")
    crash_after: int | None = Field(None, ge=0, description="Kill the worker process after this many tokens (to test crash handling).")
    fail_load: str = Field("", description="If set, loading fails with this sentence.")
    segfault_on_load: bool = Field(False, description="Crash the worker in native code while loading, as a "
                                                      "broken CUDA library would (to test crash reports).")
    context_length: int = Field(4096, ge=8, description="Most tokens per chat (prompt + reply).")
    hold_file: str = Field("", description="While this file exists, a reply waits before each token after its "
                                           "first (so a test can keep a reply running as long as it needs). "
                                           "Operator-only: it names a path on the server.",
                           json_schema_extra={"operator_only": True})
    python: str = Field("", description="Run the worker under this Python interpreter instead of the app's. "
                                        "Operator-only: it names a program to run.",
                        json_schema_extra={"operator_only": True})


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p if i == 0 else " " + p for i, p in enumerate(parts)]


class FakeBackend(Backend):
    name = "fake"
    label = "Fake: echoes your message (for tests)"
    description = "Runs no model. Replies with your last message, one word per token."
    Settings = FakeSettings
    needs_model = False

    @classmethod
    def worker_python(cls, settings):
        return settings.python or None

    def load(self, settings, progress):
        if settings.fail_load:
            raise BackendError(settings.fail_load)
        if settings.segfault_on_load:
            import ctypes
            ctypes.string_at(0)   # reads address 0: SIGSEGV
        for i in range(3):
            progress(Progress("Pretending to load", i + 1, 3, "steps"))
            time.sleep(settings.delay_s)
        self.settings = settings
        self.generated = 0
        self.counted_chars = 0
        return {"model_name": "fake-echo", "python": sys.executable,
                "interpreter_mark": os.environ.get("MOECHAT_FAKE_MARK", "")}

    def context_length(self):
        return self.settings.context_length

    def count_prompt_tokens(self, request):
        text = request.prompt if request.prompt is not None else " ".join(m.content for m in request.messages)
        self.counted_chars += len(text)
        return len(text.split())

    def generate(self, request, should_stop):
        prompt_tokens = self.count_prompt_tokens(request)   # the host refused prompts that do not fit
        users = [m.content for m in request.messages if m.role == "user"]
        source = request.prompt if request.prompt is not None else (users[-1] if users else "")
        reply = words(source or "(nothing to echo)")
        limit = request.sampling.max_new_tokens
        for i, word in enumerate(reply[:limit]):
            if should_stop():
                yield Chunk(finish_reason="cancelled")
                return
            if self.settings.crash_after is not None and i >= self.settings.crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
            while i and self.settings.hold_file and os.path.exists(self.settings.hold_file) and not should_stop():
                time.sleep(0.02)
            time.sleep(self.settings.delay_s)
            self.generated += 1
            yield Chunk(text=word, tokens=1, prompt_tokens=prompt_tokens if i == 0 else None)
        yield Chunk(finish_reason="length" if len(reply) > limit else "stop")

    def stats(self):
        return {"fake_tokens_generated": self.generated, "fake_prompt_chars_counted": self.counted_chars}


@hookimpl
def register_backends(register):
    register(FakeBackend)
