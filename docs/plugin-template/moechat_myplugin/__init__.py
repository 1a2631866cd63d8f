"""A moechat backend plugin: replace the echo with your engine (see docs/plugin-hooks.md)."""

from __future__ import annotations

import time

from pydantic import Field

from moechat.backends.api import Backend, BackendSettings, Chunk, Progress, SettingsInvalid
from moechat.backends.hookspecs import hookimpl


class MySettings(BackendSettings):
    context_length: int = Field(512, ge=16, description="Most tokens per chat (prompt and reply).")
    max_reply_tokens: int = Field(128, ge=1, description="Most tokens in one reply.")
    delay_s: float = Field(0.0, ge=0, le=1, description="Seconds to wait before each token (to watch it stream).")


class MyBackend(Backend):
    name = "my-backend"
    label = "My backend"
    description = "Echoes your last message (a template: replace it with your engine)."
    Settings = MySettings
    needs_model = False   # True (the default) if it loads a model folder: settings.model is its path

    @classmethod
    def check(cls, settings, model):
        """Refuse settings that do not go together, before the loaded model is unloaded."""
        if settings.max_reply_tokens >= settings.context_length:
            raise SettingsInvalid("max_reply_tokens must be below context_length: lower max_reply_tokens.")

    def load(self, settings, progress):
        progress(Progress("Loading", 1, 1, "steps"))   # import your engine here, not at the top
        self.settings = settings
        return {"model_name": "my-model"}

    def context_length(self):
        return self.settings.context_length

    def count_prompt_tokens(self, request):
        text = request.prompt if request.prompt is not None else " ".join(m.content for m in request.messages)
        return len(text.split())

    def generate(self, request, should_stop):
        users = [m.content for m in request.messages if m.role == "user"]
        words = (request.prompt if request.prompt is not None else (users[-1] if users else "")).split()
        last = request.messages[-1] if request.messages else None
        if request.continue_last and last is not None and last.role == "assistant":
            said = last.content.split()   # continue the open assistant message, do not repeat it
            words = words[len(said):] if words[:len(said)] == said else words
        limit = min(request.sampling.max_new_tokens, self.settings.max_reply_tokens)
        for i, word in enumerate(words[:limit]):
            if should_stop():
                yield Chunk(finish_reason="cancelled")
                return
            time.sleep(self.settings.delay_s)
            yield Chunk(text=word if i == 0 else " " + word, tokens=1,
                        prompt_tokens=self.count_prompt_tokens(request) if i == 0 else None)
        yield Chunk(finish_reason="length" if len(words) > limit else "stop")

    def stats(self):
        return {}


@hookimpl
def register_backends(register):
    register(MyBackend)
