"""moechat-llamacpp: a moechat backend that runs GGUF files with llama.cpp (llama-cpp-python).

The worker process drives a ``llama_cpp.Llama`` object in process (see README.md for why, rather
than llama.cpp's server as a child). Written only against moechat's public plugin API
(``moechat.backends.api`` and ``moechat.backends.hookspecs``), as any outside author would.

Nothing heavy is imported here: ``llama_cpp`` is imported in the worker, ``gguf`` (numpy) when a
file is read.
"""

from __future__ import annotations

import codecs
import random
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from moechat.backends.api import (
    Backend,
    BackendError,
    BackendSettings,
    Chunk,
    GenerateRequest,
    MemoryItem,
    MemoryPlan,
    Probe,
    Progress,
    PromptTooLong,
)
from moechat.backends.hookspecs import hookimpl

from moechat_llamacpp import gguf_file
from moechat_llamacpp.gguf_file import EXPERT_TENSOR, BLOCK_TENSOR, KV_TYPE_BYTES, GgufError

NAME = "llama.cpp"
INSTALL = "pip install llama-cpp-python gguf (or `make install` in a moechat checkout)"
# GPU backends of ggml, as the shared libraries a GPU build of llama-cpp-python installs.
GPU_LIBRARIES = ("libggml-cuda", "libggml-hip", "libggml-vulkan", "libggml-metal", "libggml-sycl")
# The worker process itself (Python, numpy, llama.cpp's code), measured on the CPU build; a CUDA
# build's worker holds more host RAM (the CUDA runtime): 0.58 GB after loading with every layer on
# an H100, 0.17 GB of it the token embeddings (bench/results/compare-20261206-2013-*-llamacpp).
WORKER_BYTES = 200 * 1024**2
WORKER_GPU_BYTES = 380 * 1024**2
# The most prompt tokens llama.cpp computes at once (n_ubatch): its compute buffer is sized for it.
UBATCH = 512
GGML_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
NO_CPU_MOE = ("This llama-cpp-python does not expose llama.cpp's tensor overrides (--n-cpu-moe, "
              "-ot exps=CPU), so it cannot keep experts on the CPU")


class LlamaCppSettings(BackendSettings):
    model: str = Field("", description="The GGUF file: a .gguf under the models folder, or a folder that "
                                       "holds one .gguf (the first part of a split GGUF is found too).")
    max_context: int = Field(4096, ge=16, le=1_048_576,
                             description="Context size (llama.cpp's n_ctx): most tokens per chat, prompt and "
                                         "reply; sizes the KV cache. Capped at the model's own limit.")
    gpu_layers: int = Field(-1, ge=-1, description="Layers on the GPU (n_gpu_layers), counted from the end with "
                                                   "the output layer first: 1 is the output layer alone, 2 adds the "
                                                   "last block; -1 puts all of them there, 0 none. Needs a GPU "
                                                   "build of llama-cpp-python (see the plugin's README); a CPU build "
                                                   "runs everything on the CPU.")
    n_cpu_moe: int = Field(0, ge=0, description="Keep the routed experts of the first N layers in host RAM "
                                                "(llama.cpp's --n-cpu-moe). " + NO_CPU_MOE + ": leave it at 0 "
                                                "and lower gpu_layers instead, or use moe-offload.")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads for generation. Empty: "
                                                                  "llama.cpp's default, about one per core; on a "
                                                                  "small machine that also serves the page, leave "
                                                                  "a core free.")
    batch_size: int = Field(512, ge=1, le=65536, description="Prompt tokens evaluated per step (n_batch); "
                                                             "Stop takes effect between steps.")
    flash_attention: bool = Field(False, description="Use flash attention (needed for a quantized V cache).")
    use_mmap: bool = Field(True, description="Map the file into memory instead of reading it (faster loads; "
                                             "the OS may page weights out under memory pressure).")
    use_mlock: bool = Field(False, description="Lock the weights in RAM so the OS never pages them out.")
    kv_cache_type: Literal["f16", "f32", "q8_0", "q4_0"] = Field(
        "f16", description="Type of the KV cache (K and V). q8_0 halves it, q4_0 quarters it; both need "
                           "flash attention.")

    @model_validator(mode="after")
    def _quantized_cache_needs_flash_attention(self):
        if self.kv_cache_type in ("q8_0", "q4_0") and not self.flash_attention:
            raise ValueError(f"a {self.kv_cache_type} KV cache needs flash attention: turn flash_attention on, "
                             "or set kv_cache_type to f16")
        return self


def gpu_build() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend (read from the files it
    installed: importing it would start the GPU in the app process)."""
    spec = find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib.is_dir() and any(p.name.startswith(GPU_LIBRARIES) for p in lib.iterdir())


def output_on_gpu(gpu_layers: int, on_gpu: bool) -> bool:
    """Whether llama.cpp puts the output layer on the GPU: it is the first of ``gpu_layers``."""
    return on_gpu and gpu_layers != 0


def placement(g: gguf_file.GgufFile, gpu_layers: int, n_cpu_moe: int, on_gpu: bool) -> tuple[int, int, int]:
    """Bytes of weights on the GPU, in host RAM, and attention blocks on the GPU, the way llama.cpp
    places them (llama-model.cpp, ``i_gpu_start``): ``gpu_layers`` counts the output layer as one
    layer after the blocks, from the end, so the GPU holds the output layer and the last
    ``gpu_layers - 1`` blocks (all of them from ``gpu_layers`` = blocks + 1, or -1); token
    embeddings stay on the CPU, and so do the experts of the first ``n_cpu_moe`` blocks."""
    n_layer = g.layers
    ngl = n_layer + 1 if gpu_layers < 0 else min(gpu_layers, n_layer + 1)
    first = n_layer + 1 - ngl if on_gpu else n_layer + 1  # the output layer is layer n_layer
    gpu = host = 0
    attn_blocks: set[int] = set()
    for t in g.tensors:
        m = BLOCK_TENSOR.match(t.name)
        if m:
            layer = int(m.group(1))
            here = layer >= first and not (EXPERT_TENSOR.match(t.name) and layer < n_cpu_moe)
            if here and ".attn_k" in t.name:
                attn_blocks.add(layer)
        else:
            here = output_on_gpu(gpu_layers, on_gpu) and t.name.startswith("output")
        if here:
            gpu += t.bytes
        else:
            host += t.bytes
    return gpu, host, len(attn_blocks)


def memory_items(g: gguf_file.GgufFile, settings: LlamaCppSettings, gpu_layers: int, on_gpu: bool,
                 context: int) -> list[MemoryItem]:
    """What a load needs where, for ``gpu_layers`` blocks on the GPU (when ``on_gpu``)."""
    gpu_w, host_w, gpu_attn = placement(g, gpu_layers, settings.n_cpu_moe, on_gpu)
    kv = g.kv_bytes_per_token(settings.kv_cache_type) * context
    kv_gpu = kv * gpu_attn // g.attention_layers if g.attention_layers else 0
    width = g.arch_key("embedding_length") or 0
    batch = min(settings.batch_size, UBATCH, context)  # llama.cpp's n_ubatch for the load's n_batch and n_ctx
    # llama.cpp's compute buffers: activations of a batch on each device that computes blocks, and
    # the logits of a batch (f32) where the output layer is
    acts = batch * 16 * width * 4
    on_cpu = not on_gpu or 0 <= gpu_layers <= g.layers  # some blocks computed on the CPU
    fmt = f"{g.quantization}, mmap" if settings.use_mmap else g.quantization
    kv_what = f"KV cache for {context} tokens ({settings.kv_cache_type})"
    acts_what = f"activations of a batch of {batch}"
    logits = MemoryItem(f"logits of a batch of {batch} ({g.vocab_size} tokens)",
                        "gpu" if output_on_gpu(gpu_layers, on_gpu) else "host", batch * g.vocab_size * 4)
    items = [MemoryItem("worker process (Python, llama.cpp)", "host", WORKER_GPU_BYTES if on_gpu else WORKER_BYTES),
             MemoryItem("weights on the GPU", "gpu", gpu_w, fmt),
             MemoryItem("weights in host RAM", "host", host_w, fmt),
             MemoryItem(kv_what, "gpu", kv_gpu), MemoryItem(kv_what, "host", kv - kv_gpu),
             MemoryItem(acts_what, "gpu", acts if on_gpu else 0, "estimate"),
             MemoryItem(acts_what, "host", acts if on_cpu else 0, "estimate"), logits]
    return [i for i in items if i.bytes]


def not_gguf(path: str | None) -> GgufError:
    what = f"{path} is not a GGUF file or a folder with one" if path else "the built-in demo model is not one"
    return GgufError(f"The llama.cpp backend runs GGUF files, and {what}. Pick a .gguf file as the model, "
                     "convert a Hugging Face folder with llama.cpp's convert_hf_to_gguf.py, or choose "
                     "another backend.")


class LlamaCppBackend(Backend):
    name = NAME
    label = "llama.cpp: GGUF files (Q4_K_M and friends)"
    description = ("Runs a .gguf file with llama.cpp through llama-cpp-python, in the worker process. "
                   "GPU layers need a GPU build (CMAKE_ARGS=-DGGML_CUDA=on).")
    Settings = LlamaCppSettings
    torch_gpu_memory = False  # llama.cpp allocates its own; a budget arrives as gpu_layers

    @classmethod
    def probe(cls, settings=None) -> Probe:
        missing = [m for m in ("llama_cpp", "gguf") if find_spec(m) is None]
        if missing:
            return Probe(False, f"{' and '.join(missing)} not installed: run {INSTALL}.")
        if gpu_build():
            return Probe(True)
        return Probe(True, "CPU build of llama.cpp: everything runs on the CPU. For the GPU, reinstall with "
                           "CMAKE_ARGS=-DGGML_CUDA=on (see the plugin's README).")

    @classmethod
    def plan(cls, model: Any, settings: LlamaCppSettings, machine: Any) -> MemoryPlan:
        if model is None or (model.config or {}).get("format") != "gguf":
            raise not_gguf(model.path if model is not None else None)
        g = gguf_file.read(model.path)
        gpus = list(getattr(machine, "gpus", []) or [])
        on_gpu = bool(gpus) and gpu_build() and settings.gpu_layers != 0
        context = min(settings.max_context, model.context_length or settings.max_context)
        plan = MemoryPlan(items=memory_items(g, settings, settings.gpu_layers, on_gpu, context),
                          host_available=machine.host_available)
        if on_gpu:
            plan.gpu_available = max(gpus[0].total - gpus[0].used, 0)
        elif gpus:
            plan.notes.append("Everything runs on the CPU: " + (
                "gpu_layers is 0." if settings.gpu_layers == 0 else
                "this llama-cpp-python is a CPU build (reinstall with CMAKE_ARGS=-DGGML_CUDA=on)."))
        if settings.n_cpu_moe:
            plan.notes.append(NO_CPU_MOE + "; the load will refuse n_cpu_moe above 0.")
        if plan.gpu_available is not None and plan.gpu_bytes > plan.gpu_available:
            fitting = next((n for n in range(g.layers, -1, -1)
                            if sum(i.bytes for i in memory_items(g, settings, n, True, context)
                                   if i.device == "gpu") <= plan.gpu_available), 0)
            plan.advice.append(f"Set gpu_layers to {fitting} (of {g.layers + 1}: {g.layers} blocks and the output "
                               f"layer) so the rest run on the CPU, or "
                               f"lower max_context (now {context}), or pick a smaller quantization of the model.")
        if plan.host_available is not None and plan.host_bytes > plan.host_available:
            more = ", or put more layers on the GPU (gpu_layers)" if on_gpu and settings.gpu_layers >= 0 else ""
            plan.advice.append(f"Free host RAM (close other programs), lower max_context or pick a smaller "
                               f"quantization of the model{more}.")
        return plan

    # ---- in the worker -----------------------------------------------------------------------
    def load(self, settings: LlamaCppSettings, progress) -> dict[str, Any]:
        import llama_cpp

        file = gguf_file.find_gguf(settings.model) if settings.model else None
        if file is None:
            raise not_gguf(settings.model or None)
        g = gguf_file.read(file)
        if settings.n_cpu_moe:
            raise BackendError(f"{NO_CPU_MOE}. Set n_cpu_moe to 0 and lower gpu_layers instead, or use moe-offload.")
        context = min(settings.max_context, g.arch_key("context_length") or settings.max_context)
        self.log = LlamaLog(llama_cpp)
        progress(Progress(f"Loading {file.name} with llama.cpp"))
        kv_type = GGML_KV_TYPES[settings.kv_cache_type]
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(file), n_ctx=context, n_gpu_layers=settings.gpu_layers,
                n_threads=settings.threads, n_threads_batch=settings.threads, n_batch=settings.batch_size,
                n_ubatch=min(settings.batch_size, UBATCH), flash_attn=settings.flash_attention,
                use_mmap=settings.use_mmap, use_mlock=settings.use_mlock, type_k=kv_type, type_v=kv_type,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise self.log.load_error(file, g.architecture, exc) from None
        self.file = file
        self.context = self.llm.n_ctx()
        self.batch = settings.batch_size
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        self.last: dict[str, Any] = {}
        self.replies = 0
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        return {"model_name": file.name, "architecture": g.architecture, "quantization": g.quantization,
                "context_length": self.context, "llama_cpp_version": llama_cpp.__version__,
                "gpu_offload": self.gpu_offload}

    def context_length(self) -> int | None:
        return self.context

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.prompt is not None:
            return self.llm.tokenize(request.prompt.encode(), add_bos=True, special=False)
        messages = [m.model_dump() for m in request.messages]
        if not messages:
            raise BackendError("The request has no messages.")
        cont = request.continue_last and messages[-1]["role"] == "assistant"
        if self.template:
            text = self.render_template(messages[:-1] if cont else messages)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in (messages[:-1] if cont else messages))
            text += "assistant: "
        if cont:
            text += messages[-1]["content"]
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def render_template(self, messages: list[dict[str, str]]) -> str:
        """The GGUF's chat template (``tokenizer.chat_template``) rendered in Jinja's sandbox: the
        template comes from a file, and a file must not run code on the server."""
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode(errors="replace")
        try:
            return env.from_string(self.template).render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token=eos,
                raise_exception=raise_exception)
        except TemplateError as exc:
            raise BackendError(f"The chat template in {self.file.name} failed: {exc}") from None

    def count_prompt_tokens(self, request: GenerateRequest) -> int | None:
        return len(self.prompt_ids(request))

    def generate(self, request: GenerateRequest, should_stop) -> Iterator[Chunk]:
        import llama_cpp

        llm = self.llm
        ids = self.prompt_ids(request)
        if len(ids) >= self.context:
            raise PromptTooLong(f"The prompt is {len(ids)} tokens but the model takes at most {self.context} "
                                "(max_context). Shorten the chat (start a new one or delete old messages) or "
                                "raise max_context.")
        sp = request.sampling
        max_new = min(sp.max_new_tokens, self.context - len(ids))
        llm.set_seed(sp.seed if sp.seed is not None else random.getrandbits(31))
        llama_cpp.llama_perf_context_reset(llm.ctx)
        yield Chunk(prompt_tokens=len(ids))
        if len(ids) > self.batch:  # evaluate a long prompt a batch at a time, so Stop lands between batches
            llm.reset()
            for start in range(0, len(ids), self.batch):
                if should_stop():
                    self._record(0, "cancelled")
                    yield Chunk(finish_reason="cancelled")
                    return
                llm.eval(ids[start:start + self.batch])
        vocab = llm._model.vocab
        stops = [s for s in sp.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character
        text = ""          # decoded text not yet sent (held back while it may start a stop string)
        made, finish = 0, "length"
        tokens = llm.generate(ids, top_k=sp.top_k, top_p=sp.top_p, min_p=0.0, temp=sp.temperature,
                              repeat_penalty=sp.repetition_penalty, reset=True)
        try:
            for token in tokens:
                if should_stop():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                made += 1
                text += decoder.decode(llm.detokenize([token], special=False))
                hit = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
                if hit >= 0:
                    yield Chunk(text=text[:hit], tokens=1)
                    text, finish = "", "stop"
                    break
                cut = max(len(text) - hold, 0)
                yield Chunk(text=text[:cut], tokens=1)
                text = text[cut:]
                if made >= max_new:
                    break
        finally:
            tokens.close()
        text += decoder.decode(b"", final=True)
        if finish != "cancelled" and text:
            yield Chunk(text=text)
        self._record(made, finish)
        yield Chunk(finish_reason=finish)

    def _record(self, made: int, finish: str) -> None:
        import llama_cpp

        perf = llama_cpp.llama_perf_context(self.llm.ctx)
        self.replies += 1
        self.last = {
            "llama_prompt_eval_ms": round(perf.t_p_eval_ms, 3), "llama_prompt_eval_tokens": perf.n_p_eval,
            "llama_eval_ms": round(perf.t_eval_ms, 3), "llama_eval_tokens": perf.n_eval,
            "llama_prefill_tok_s": round(perf.n_p_eval * 1000 / perf.t_p_eval_ms, 2) if perf.t_p_eval_ms else None,
            "llama_decode_tok_s": round(perf.n_eval * 1000 / perf.t_eval_ms, 2) if perf.t_eval_ms else None,
            "llama_graph_reuses": perf.n_reused, "llama_last_finish": finish,
        }

    def stats(self) -> dict[str, Any]:
        # Read while a reply may stream (the worker answers stats from another thread): plain
        # numbers only, no call into the llama.cpp context.
        llm = getattr(self, "llm", None)
        if llm is None:
            return {}
        return dict(self.last, llama_kv_tokens=llm.n_tokens, llama_n_ctx=self.context,
                    llama_kv_used=round(llm.n_tokens / self.context, 4), llama_replies=self.replies,
                    llama_gpu_offload=self.gpu_offload, llama_model_file=self.file.name)

    def perplexity(self, text: str) -> float:
        raise NotImplementedError

    def unload(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()  # frees the model and its context now; the worker process ends next anyway
            self.llm = None


class LlamaLog:
    """Captures llama.cpp's log lines (errors still go to stderr) so a failed load can say why."""

    def __init__(self, llama_cpp: Any):
        import sys

        self.lines: list[str] = []

        def on_log(level: int, text: bytes, _user: Any) -> None:
            line = text.decode("utf-8", errors="replace")
            self.lines.append(line)
            del self.lines[:-200]
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(line)

        self.callback = llama_cpp.llama_log_callback(on_log)  # kept: llama.cpp holds a pointer to it
        llama_cpp.llama_log_set(self.callback, None)

    def load_error(self, file: Path, arch: str, exc: Exception) -> BackendError:
        text = "".join(self.lines)
        if "unknown model architecture" in text:
            import llama_cpp

            return BackendError(
                f"This llama.cpp build (llama-cpp-python {llama_cpp.__version__}) does not know the architecture "
                f"{arch!r} of {file.name}. Update it (pip install -U llama-cpp-python, which rebuilds llama.cpp) "
                "or pick a GGUF of an architecture it knows.")
        if "failed to allocate" in text or "out of memory" in text.lower():
            return BackendError(f"llama.cpp ran out of memory loading {file.name}. Lower gpu_layers or max_context, "
                                "or pick a smaller quantization.")
        errors = [ln.strip() for ln in self.lines if "error" in ln.lower() or "failed" in ln.lower()]
        detail = "; ".join(errors[-3:]) or str(exc)
        return BackendError(f"llama.cpp could not load {file.name}: {detail}. The file may be damaged "
                            "(copy it again) or need a newer llama-cpp-python.")


@hookimpl
def register_backends(register):
    register(LlamaCppBackend)


@hookimpl
def inspect_model(path: str):
    return gguf_file.model_info(path)


@hookimpl
def model_file_suffixes():
    return [gguf_file.SUFFIX]


@hookimpl
def suggest_backend(model):
    return NAME if (model.config or {}).get("format") == "gguf" else None
