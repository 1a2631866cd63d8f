"""Compare backends on the same prompt: presets, the runner, storage and export. No Gradio here.

A *preset* is a named (backend, settings) pair, the settings including the model folder. A
comparison runs one prompt through several presets, one after another, through the one
``BackendManager`` (the one owner of the loaded model, which holds one model at a time, so two
entries are never loaded together): load the entry, generate, keep the text and the numbers, run
the output self-check, unload, go on. A failed entry keeps its sentence and the others still run;
Cancel stops the entry in progress and skips the rest. Afterwards the backend loaded before (or
the one the person picked, or none) is loaded again.

Where outputs should agree (same weights, greedy sampling), ``first_difference`` says at which
generated token an entry first differs from the first entry that produced text.

    store = CompareStore.in_data_dir(data_dir)
    store.save_preset(Preset("tiny-cpu", "transformers", {"model": "/models/x", "device": "cpu"}))
    runner = CompareRunner(manager, [store.preset("tiny-cpu"), ...], prompt="Hello")
    run = runner.run()            # blocks; runner.snapshot() from another thread shows progress
    store.save_run(run); to_markdown(run)
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from moechat.backends.api import BackendError, GenerateRequest, Message, secret_fields
from moechat.webui.handlers.stats import fmt_bytes

AFTER_PREVIOUS = "previous"    # after a comparison, load again what was loaded before it
AFTER_NOTHING = "nothing"      # leave nothing loaded
PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CompareError(Exception):
    """A sentence for the person: a bad preset name, an unknown preset, nothing to compare."""


def public_settings(manager: Any, preset: Preset) -> dict[str, Any]:
    """``preset``'s settings without credentials (what may be shown to others, stored with a run,
    exported): its backend's ``SecretStr`` fields hidden; every value but the model folder hidden
    when the backend is not installed here (its fields are unknown)."""
    entry = manager.backends().get(preset.backend)
    hidden = secret_fields(entry.cls.Settings) if entry else set(preset.settings) - {"model"}
    return {k: ("(hidden)" if k in hidden and v else v) for k, v in preset.settings.items()}


@dataclass
class Preset:
    name: str
    backend: str
    settings: dict[str, Any] = field(default_factory=dict)   # includes "model" where the backend takes one

    @property
    def model(self) -> str:
        return str(self.settings.get("model") or "")

    def label(self) -> str:
        model = Path(self.model).name if self.model else ("demo model" if "model" in self.settings else "")
        return f"{self.name} ({self.backend}{', ' + model if model else ''})"


def check_settings(manager: Any, preset: Preset) -> None:
    """Refuse a preset whose backend is unknown or whose settings do not validate (a sentence)."""
    try:
        manager.parse_settings(preset.backend, preset.settings)
    except BackendError as exc:
        raise CompareError(str(exc)) from exc


def check_preset_name(name: str) -> str:
    name = (name or "").strip()
    if not PRESET_NAME.match(name):
        raise CompareError("Give the preset a name of letters, digits, '-', '_' or '.' (at most 64), "
                           "starting with a letter or digit, e.g. moe-offload-24gb.")
    return name


# ---- one run's results -------------------------------------------------------------------------
@dataclass
class EntryResult:
    """One preset's part of a comparison."""

    preset: str
    backend: str
    model: str
    settings: dict[str, Any]                  # public_settings of the preset
    status: str = "waiting"                   # waiting | loading | generating | checking | done | failed | cancelled
    detail: str = ""                          # the load stage while loading
    error: str = ""                           # the sentence of a failed entry
    text: str = ""
    pieces: list[str] = field(default_factory=list)   # the generated text, one piece per chunk
    piece_tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    load_time_s: float | None = None
    ttft_s: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    peak_gpu_bytes: int | None = None
    peak_gpu_source: str | None = None
    peak_host_bytes: int | None = None
    backend_stats: dict[str, Any] = field(default_factory=dict)
    selfcheck: dict[str, Any] | None = None   # SelfCheck.to_dict()
    first_diff: int | None = None             # generated token where the text first differs from the reference
    same_as_reference: bool | None = None     # None: this is the reference, or there is none


@dataclass
class CompareRun:
    prompt: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    entries: list[EntryResult]
    after: str = AFTER_PREVIOUS
    user: str = ""
    id: int | None = None
    status: str = "running"                   # running | done | cancelled
    note: str = ""                            # what happened after the run (the reload)
    reference: str | None = None              # the preset the others are compared with
    started: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    finished: str | None = None
    commit: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareRun:
        data = dict(data)
        data["entries"] = [EntryResult(**e) for e in data.get("entries") or []]
        return cls(**data)


def first_difference(a: EntryResult, b: EntryResult) -> int | None:
    """The generated token at which ``b``'s text first differs from ``a``'s; None when they are the
    same. Text is compared piece by piece (each streamed chunk); a chunk that stands for several
    tokens counts as that many."""
    index = 0
    for i, (pa, pb) in enumerate(zip(a.pieces, b.pieces)):
        if pa != pb:
            return index
        index += a.piece_tokens[i] if i < len(a.piece_tokens) else 1
    if len(a.pieces) != len(b.pieces):
        return index
    return None


def diff_offset(e: EntryResult) -> int | None:
    """The character of ``e.text`` where its first difference (a token index) begins."""
    if e.first_diff is None:
        return None
    tokens = chars = 0
    for piece, n in zip(e.pieces, e.piece_tokens):
        if tokens >= e.first_diff:
            break
        tokens += n
        chars += len(piece)
    return chars


def mark_differences(run: CompareRun) -> None:
    """Set each finished entry's first difference from the first entry that produced text."""
    done = [e for e in run.entries if e.status == "done" and e.pieces]
    if not done:
        run.reference = None
        return
    ref = done[0]
    run.reference = ref.preset
    for e in done[1:]:
        e.first_diff = first_difference(ref, e)
        e.same_as_reference = e.first_diff is None


# ---- the runner --------------------------------------------------------------------------------
class CompareRunner:
    """Runs one comparison through ``manager``. ``run()`` blocks; ``cancel()`` and ``snapshot()``
    may be called from other threads."""

    def __init__(self, manager: Any, presets: list[Preset], *, prompt: str = "",
                 messages: list[dict[str, str]] | None = None, sampling: dict[str, Any] | None = None,
                 after: str | Preset = AFTER_PREVIOUS, user: str = "", selfcheck: bool = True):
        if len(presets) < 1:
            raise CompareError("Choose at least one preset to run (two or more to compare).")
        names = [p.name for p in presets]
        if len(set(names)) != len(names):
            raise CompareError("Choose each preset once; to run the same settings twice, save them under a "
                               "second name.")
        messages = [dict(m) for m in messages or []]
        if not messages and not prompt.strip():
            raise CompareError("Type a prompt (or use the open chat) first.")
        from moechat.webui.handlers.turns import sampling_from
        try:
            params = sampling_from(dict({"temperature": 0.0, "max_new_tokens": 64}, **(sampling or {})))
        except ValueError as exc:
            raise CompareError(str(exc)) from exc
        if not messages:
            messages = [{"role": "user", "content": prompt}]
        self.manager = manager
        self.presets = presets
        self.params = params
        self.after = after
        self.user = user
        self.selfcheck = selfcheck
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._gen: Any = None
        after_name = after.name if isinstance(after, Preset) else after
        self.result = CompareRun(prompt=prompt or messages[-1]["content"], messages=messages,
                                 sampling=params.model_dump(), after=after_name, user=user,
                                 entries=[EntryResult(p.name, p.backend, p.model, public_settings(manager, p))
                                          for p in presets])

    # ---- from other threads ----
    def cancel(self) -> None:
        """Stop the entry in progress (its load or its reply) and skip the ones after it."""
        self._cancel.set()
        with self._lock:
            gen = self._gen
            loading = any(e.status == "loading" for e in self.result.entries)
        if gen is not None:
            gen.stop()
        if loading:
            self.manager.cancel_load()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> CompareRun:
        """A copy of the results so far (safe to read while the run goes on)."""
        with self._lock:
            return CompareRun.from_dict(json.loads(json.dumps(self.result.to_dict(), default=str)))

    # ---- the run ----
    def run(self) -> CompareRun:
        from moechat.backends.benchmark import git_commit, machine_facts
        manager = self.manager
        previous = (manager.state.backend, dict(manager.state.settings)) if manager.state.ready else None
        commit, dirty = git_commit()
        with self._lock:
            self.result.commit = {"git_commit": commit, "git_dirty": dirty}
            self.result.machine = machine_facts(0)
        for preset, entry in zip(self.presets, self.result.entries):
            if self.cancelled:
                self._set(entry, status="cancelled", error="Cancelled before it started.")
                continue
            self._run_entry(preset, entry)
            self._unload()          # output and numbers kept: free the memory before the next
            with self._lock:
                mark_differences(self.result)
        note = self._restore(previous)
        with self._lock:
            self.result.note = note
            self.result.status = "cancelled" if self.cancelled else "done"
            self.result.finished = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return self.result

    def _set(self, entry: EntryResult, **values: Any) -> None:
        with self._lock:
            for k, v in values.items():
                setattr(entry, k, v)

    def _run_entry(self, preset: Preset, entry: EntryResult) -> None:
        from moechat.backends import selfcheck
        from moechat.webui.commands.bench import gpu_peak, peak_rss
        manager = self.manager
        self._set(entry, status="loading", detail="waiting for the model to be free")
        started = time.perf_counter()
        try:
            info = manager.load(preset.backend, dict(preset.settings), user=self.user or None,
                                on_progress=lambda p: self._set(entry, detail=p.stage))
        except BackendError as exc:
            if self.cancelled:
                self._set(entry, status="cancelled", error="Cancelled while loading.", detail="")
            else:
                self._set(entry, status="failed", error=f"Load failed: {exc}", detail="")
            return
        except Exception as exc:        # a backend bug: this entry fails, the others still run
            logger.exception("compare: load of {} failed", preset.name)
            self._set(entry, status="failed", error=f"Load failed: {type(exc).__name__}: {exc}", detail="")
            return
        self._set(entry, status="generating", detail="", model=str(info.get("model_name") or entry.model),
                  load_time_s=info.get("load_time_s") or round(time.perf_counter() - started, 3))
        request = GenerateRequest(messages=[Message(**m) for m in self.result.messages], sampling=self.params)
        gen = manager.generate(request, user=self.user or None)
        with self._lock:
            self._gen = gen
        if self.cancelled:
            gen.stop()
        usage: dict[str, Any] = {}
        error, finish = None, None
        try:
            for ev in gen:
                if ev.kind == "chunk":
                    with self._lock:
                        entry.pieces.append(ev.text)
                        entry.piece_tokens.append(ev.tokens or 1)
                        entry.text += ev.text
                elif ev.kind == "done":
                    usage, error, finish = ev.usage, ev.error, ev.finish_reason
        finally:
            with self._lock:
                self._gen = None
        stats = {}
        try:
            stats = manager.stats(timeout=10)
        except Exception as exc:
            logger.warning("compare: stats of {} failed: {}", preset.name, exc)
        backend_stats = dict(stats.get("backend_stats") or {})
        gpu_bytes, gpu_source = gpu_peak(backend_stats.pop("gpus", None) or info.get("gpus") or [])
        backend_stats.pop("worker_rss_bytes", None)
        self._set(entry, finish_reason=finish, prompt_tokens=usage.get("prompt_tokens"),
                  completion_tokens=usage.get("completion_tokens"), ttft_s=usage.get("ttft_s"),
                  prefill_tok_s=usage.get("prefill_tok_s"), decode_tok_s=usage.get("decode_tok_s"),
                  peak_gpu_bytes=gpu_bytes, peak_gpu_source=gpu_source,
                  peak_host_bytes=peak_rss(stats.get("worker_pid")), backend_stats=backend_stats)
        if finish == "cancelled" or self.cancelled:
            self._set(entry, status="cancelled", error="Cancelled while generating; the text so far is kept.")
            return
        if error:
            self._set(entry, status="failed", error=f"Generation failed: {error}")
            return
        if self.selfcheck:
            self._set(entry, status="checking")
            self._set(entry, selfcheck=selfcheck.check_loaded(manager).to_dict())
        self._set(entry, status="done")

    def _unload(self) -> None:
        try:
            self.manager.unload()
        except Exception:
            logger.exception("unload in the comparison failed")

    def _restore(self, previous: tuple[str | None, dict[str, Any]] | None) -> str:
        """Load what comes after the comparison; a sentence saying what is loaded now."""
        if isinstance(self.after, Preset):
            target: tuple[str | None, dict[str, Any]] | None = (self.after.backend, dict(self.after.settings))
            what = f"the preset {self.after.name}"
        elif self.after == AFTER_PREVIOUS and previous is not None:
            target, what = previous, f"the {previous[0]} backend loaded before the comparison"
        else:
            return "Nothing is loaded now." if self.after == AFTER_NOTHING else \
                "Nothing was loaded before the comparison, so nothing is loaded now."
        with self._lock:
            self.result.note = f"Loading {what} again …"
        try:
            self.manager.load(target[0], target[1], user=self.user or None)
        except Exception as exc:
            return f"Could not load {what} again: {exc}"
        return f"Loaded {what} again."


# ---- storage -----------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS presets (
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    settings TEXT NOT NULL,
    created REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    created REAL NOT NULL,
    presets TEXT NOT NULL,
    prompt TEXT NOT NULL,
    git_commit TEXT,
    machine TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT NOT NULL
);
"""


class CompareStore:
    """Presets (shared by everyone on the server) and comparison runs (each person's own), in
    SQLite. Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | Path):
        from moechat.webui.chats import open_database
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = open_database(self.path, SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> CompareStore:
        return cls(Path(data_dir) / "compare.sqlite3")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- presets ----
    def save_preset(self, preset: Preset, user: str = "") -> None:
        """Save (or replace) ``preset``."""
        name = check_preset_name(preset.name)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO presets(name, backend, settings, created, created_by) "
                             "VALUES (?,?,?,?,?)", (name, preset.backend, json.dumps(preset.settings),
                                                    time.time(), user))

    def presets(self) -> list[Preset]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM presets ORDER BY name").fetchall()
        return [Preset(r["name"], r["backend"], json.loads(r["settings"])) for r in rows]

    def preset(self, name: str) -> Preset:
        for p in self.presets():
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.presets()) or "none yet"
        raise CompareError(f"There is no preset named {name!r} (saved presets: {known}).")

    def delete_preset(self, name: str) -> None:
        with self._lock:
            if not self._db.execute("DELETE FROM presets WHERE name=?", (name,)).rowcount:
                raise CompareError(f"There is no preset named {name!r}.")

    # ---- runs ----
    def save_run(self, run: CompareRun) -> int:
        """Store ``run`` (a new one, or again once it has finished); returns its id."""
        data = run.to_dict()
        values = (run.user, time.time(), json.dumps([e.preset for e in run.entries]), run.prompt,
                  run.commit.get("git_commit"), json.dumps(run.machine), run.status)
        with self._lock:
            if run.id is None:
                cur = self._db.execute("INSERT INTO runs(user, created, presets, prompt, git_commit, machine, status, "
                                       "result) VALUES (?,?,?,?,?,?,?,'{}')", values)
                run.id = int(cur.lastrowid)
                data["id"] = run.id
            self._db.execute("UPDATE runs SET status=?, result=? WHERE id=?",
                             (run.status, json.dumps(data, default=str), run.id))
        return run.id

    def runs(self, user: str, limit: int = 30) -> list[tuple[int, str]]:
        """(id, label) of ``user``'s runs, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, created, presets, prompt FROM runs WHERE user=? ORDER BY id DESC "
                                    "LIMIT ?", (user, limit)).fetchall()
        out = []
        for r in rows:
            when = time.strftime("%d %b %H:%M", time.localtime(r["created"]))
            prompt = r["prompt"] if len(r["prompt"]) <= 30 else r["prompt"][:29] + "…"
            out.append((r["id"], f"{when} · {', '.join(json.loads(r['presets']))} · {prompt}"))
        return out

    def run(self, run_id: int, user: str) -> CompareRun:
        with self._lock:
            row = self._db.execute("SELECT result FROM runs WHERE id=? AND user=?", (run_id, user)).fetchone()
        if row is None:
            raise CompareError("That comparison does not exist.")
        return CompareRun.from_dict(json.loads(row["result"]))


# ---- export ------------------------------------------------------------------------------------
def fmt_num(x: float | None, spec: str = "{:.1f}") -> str:
    return "–" if x is None else spec.format(x)


def cache_hit_rate(stats: dict[str, Any]) -> float | None:
    """The expert-cache hit rate a backend reports (moe-offload), if any."""
    for key, value in stats.items():
        if "hit_rate" in key and isinstance(value, (int, float)):
            return float(value)
    return None


def verdict(e: EntryResult) -> str:
    """The self-check in a few words."""
    if not e.selfcheck:
        return "–"
    passed = e.selfcheck.get("passed")
    return "passed" if passed else ("FAILED: likely garbage" if passed is False else "not checked")


def difference_text(run: CompareRun, e: EntryResult) -> str:
    if run.reference is None or e.status != "done" or not e.pieces:
        return "–"
    if e.preset == run.reference:
        return "reference"
    if e.first_diff is None:
        return f"same as {run.reference}"
    return f"differs from {run.reference} at token {e.first_diff}"


def rows(run: CompareRun) -> list[tuple[str, list[str]]]:
    """The comparison table: (what, one value per entry)."""
    es = run.entries
    return [
        ("backend", [e.backend for e in es]),
        ("model", [e.model or "–" for e in es]),
        ("status", [e.status + (f": {e.error}" if e.error else "") for e in es]),
        ("first difference", [difference_text(run, e) for e in es]),
        ("output self-check", [verdict(e) for e in es]),
        ("load time", [fmt_num(e.load_time_s, "{:.1f} s") for e in es]),
        ("time to first token", [fmt_num(e.ttft_s, "{:.2f} s") for e in es]),
        ("prefill tok/s", [fmt_num(e.prefill_tok_s) for e in es]),
        ("decode tok/s", [fmt_num(e.decode_tok_s) for e in es]),
        ("tokens", [f"{e.prompt_tokens or 0} prompt + {e.completion_tokens or 0}" if e.completion_tokens is not None
                    else "–" for e in es]),
        ("GPU peak", [("–" if e.completion_tokens is None else "no GPU") if e.peak_gpu_bytes is None
                      else fmt_bytes(e.peak_gpu_bytes) for e in es]),
        ("host peak (worker)", [fmt_bytes(e.peak_host_bytes) for e in es]),
        ("expert-cache hit rate", [fmt_num(100 * r, "{:.1f} %") if (r := cache_hit_rate(e.backend_stats)) is not None
                                   else "–" for e in es]),
    ]


def to_json(run: CompareRun) -> str:
    return json.dumps(run.to_dict(), indent=2, default=str)


def to_markdown(run: CompareRun) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = [f"# Comparison {run.id or ''}".rstrip(), "",
             f"- started: {run.started}" + (f", finished: {run.finished}" if run.finished else ""),
             f"- commit: {run.commit.get('git_commit') or 'unknown'}",
             f"- machine: {machine_line(run.machine)}",
             f"- sampling: temperature {run.sampling.get('temperature')}, at most "
             f"{run.sampling.get('max_new_tokens')} new tokens", ""]
    if run.note:
        lines += [run.note, ""]
    lines += ["## Prompt", ""] + [f"> **{m['role']}**: {m['content']}" for m in run.messages] + [""]
    lines += ["## Results", "", "| | " + " | ".join(cell(e.preset) for e in run.entries) + " |",
              "|---|" + "---|" * len(run.entries)]
    lines += [f"| {what} | " + " | ".join(cell(v) for v in values) + " |" for what, values in rows(run)]
    for e in run.entries:
        lines += ["", f"## {e.preset}", ""]
        if e.error:
            lines += [e.error, ""]
        if e.text or not e.error:
            lines += ["```text", e.text.replace("```", "ʼʼʼ"), "```"]
        if e.selfcheck:
            lines += ["", e.selfcheck.get("message", "")]
    return "\n".join(lines) + "\n"


def machine_line(machine: dict[str, Any]) -> str:
    gpus = ", ".join(g.get("name", "?") for g in machine.get("gpus") or []) or "no GPU"
    ram = machine.get("host_total_bytes")
    return f"{machine.get('cpu', '?')}, {gpus}" + (f", {ram / 1024**3:.0f} GiB RAM" if ram else "")
