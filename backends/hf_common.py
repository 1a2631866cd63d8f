"""What the transformers-based backends share: chat templating, sampling and token streaming.

Runs in the worker process only; torch and transformers are imported inside functions.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Empty, Queue
from typing import Any, Literal

from pydantic import Field

from moechat.backends.api import Backend, BackendError, BackendSettings, Chunk, GenerateRequest, PromptTooLong, StopCheck

STREAM_TIMEOUT_S = 600.0


class HFSettings(BackendSettings):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run: auto uses the GPU when there is one.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype. auto: bfloat16 on a GPU, float32 on the CPU.")
    gpu_memory_gb: float | None = Field(None, gt=0, description="Most GPU memory for weights per device, in GB (accelerate's max_memory). Empty: all of it.")
    cpu_memory_gb: float | None = Field(None, gt=0, description="Most host RAM for offloaded weights, in GB. Empty: no limit.")
    max_context: int | None = Field(None, ge=16, description="Most tokens per chat (prompt + reply). Empty: the model's own limit.")


def chat_input_ids(tokenizer: Any, request: GenerateRequest) -> list[int]:
    """Token ids of the prompt: raw ``prompt`` text, or the chat through the chat template."""
    if request.prompt is not None:
        return tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
    messages = [m.model_dump() for m in request.messages]
    if not messages:
        raise BackendError("The request has no messages.")
    if getattr(tokenizer, "chat_template", None) is None:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return tokenizer(text)["input_ids"]
    cont = request.continue_last and messages[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces without splitting a character, and
    ends the text at the first stop string."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped = True
                text = text[:at]
        if not self.stopped:
            if text.endswith("\ufffd"):
                return ""
            # hold back a tail that could be the start of a stop string
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(self.sent, len(text) - hold)] if hold else text
        piece = text[self.sent:]
        self.sent = len(text)
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece = text[self.sent:]
        self.sent = len(text)
        return piece


class HFBackend(Backend):
    """Base for backends that run a transformers model with ``model.generate``."""

    Settings = HFSettings
    model: Any = None
    tokenizer: Any = None
    max_context: int | None = None

    def load_tokenizer(self, folder: str) -> Any:
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise BackendError(f"The tokenizer in {folder} could not be read: {exc}") from exc

    def context_length(self) -> int | None:
        return self.max_context

    def count_prompt_tokens(self, request: GenerateRequest) -> int | None:
        return len(chat_input_ids(self.tokenizer, request)) if self.tokenizer is not None else None

    def input_device(self) -> Any:
        return next(self.model.parameters()).device

    def generate(self, request: GenerateRequest, should_stop: StopCheck) -> Iterator[Chunk]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        ids = chat_input_ids(self.tokenizer, request)
        sp = request.sampling
        check_prompt_fits(len(ids), sp.max_new_tokens, self.max_context)
        max_new = min(sp.max_new_tokens, self.max_context - len(ids)) if self.max_context else sp.max_new_tokens
        decoder = IncrementalDecoder(self.tokenizer, sp.stop)
        tokens: Queue = Queue()
        end = object()

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                tokens.put(value.reshape(-1).tolist())

            def end(self):
                tokens.put(end)

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), should_stop() or decoder.stopped,
                                  dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([ids], device=self.input_device()),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.input_device()),
            max_new_tokens=max_new, streamer=Streamer(),
            stopping_criteria=StoppingCriteriaList([Stop()]),
            repetition_penalty=sp.repetition_penalty, pad_token_id=self.tokenizer.pad_token_id,
        )
        if sp.temperature > 0:
            kwargs.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if sp.seed is not None:
                    torch.manual_seed(sp.seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # reported to the consumer, never lost in the thread
                failure.append(exc)
            finally:
                tokens.put(end)

        thread = threading.Thread(target=run, daemon=True, name="hf-generate")
        thread.start()
        count = 0
        first = True
        while True:
            try:
                item = tokens.get(timeout=STREAM_TIMEOUT_S)
            except Empty:
                raise BackendError(f"The model produced no token for {STREAM_TIMEOUT_S:.0f} s.") from None
            if item is end:
                break
            count += len(item)
            piece = decoder.add(item)
            yield Chunk(text=piece, tokens=len(item), prompt_tokens=len(ids) if first else None)
            first = False
        thread.join()
        if failure:
            raise failure[0]
        tail = decoder.flush()
        if should_stop() and not decoder.stopped:
            finish = "cancelled"
        elif count >= max_new and not decoder.stopped:
            finish = "length"
        else:
            finish = "stop"
        yield Chunk(text=tail, finish_reason=finish, prompt_tokens=len(ids) if first else None)

    def perplexity(self, text: str) -> float:
        import torch
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_context:
            ids = ids[: self.max_context]
        if len(ids) < 2:
            raise BackendError("The text to score needs at least two tokens.")
        input_ids = torch.tensor([ids], device=self.input_device())
        with torch.inference_mode():
            loss = self.model(input_ids=input_ids, labels=input_ids).loss
        return float(torch.exp(loss.float()))

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None


def check_prompt_fits(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    if context and prompt_tokens >= context:
        raise PromptTooLong(
            f"The prompt is {prompt_tokens} tokens but the model takes at most {context}. "
            "Shorten the chat (start a new one or delete old messages) or raise max_context.")


def pick_device(setting: str) -> str:
    import torch
    if setting == "cuda" and not torch.cuda.is_available():
        raise BackendError("device is set to cuda but torch sees no CUDA GPU here; set device to auto or cpu.")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def pick_dtype(setting: str, device: str) -> Any:
    import torch
    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, setting)


def max_memory(settings: HFSettings, device: str) -> dict | None:
    import torch
    if settings.gpu_memory_gb is None and settings.cpu_memory_gb is None:
        return None
    mm: dict[Any, str] = {}
    if device == "cuda":
        for i in range(torch.cuda.device_count()):
            if settings.gpu_memory_gb is not None:
                mm[i] = f"{settings.gpu_memory_gb}GB"
            else:
                mm[i] = f"{torch.cuda.mem_get_info(i)[1] / 1e9:.1f}GB"
    if settings.cpu_memory_gb is not None:
        mm["cpu"] = f"{settings.cpu_memory_gb}GB"
    return mm


def model_context(config: Any, setting: int | None) -> int | None:
    own = getattr(config, "max_position_embeddings", None)
    if setting and own:
        return min(setting, own)
    return setting or own


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of every parameter and buffer by device type, counting quantized storage as stored."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[t.device.type] = out.get(t.device.type, 0) + t.numel() * t.element_size()
    # bitsandbytes parametrizations keep the quantized data next to the module
    for module in model.modules():
        for p in getattr(module, "parametrizations", {}).values():
            orig = getattr(p, "original", None)
            if orig is not None and id(orig) not in seen:
                seen.add(id(orig))
                out[orig.device.type] = out.get(orig.device.type, 0) + orig.numel() * orig.element_size()
    return out
