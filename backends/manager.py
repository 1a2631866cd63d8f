"""BackendManager: the one owner of the loaded backend.

The loaded backend lives in a worker process (``moechat.backends.worker``). The manager starts it,
loads, queues generations (one at a time: one GPU serves everyone), stops them, reads stats,
and notices when the worker dies. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from pathlib import Path
from queue import Empty, Queue
from typing import Any

from loguru import logger
from pydantic import ValidationError

from moechat.backends import machine
from moechat.backends import protocol as P
from moechat.backends.api import (
    BackendError,
    BackendSettings,
    BackendUnavailable,
    Cancelled,
    GenerateRequest,
    MemoryPlan,
    PlanDoesNotFit,
    Probe,
    Progress,
    SettingsInvalid,
    error_of,
)
from moechat.backends.modelinfo import ModelInfo, inspect
from moechat.backends.plugins import BackendEntry, Plugins

START_TIMEOUT_S = float(os.environ.get("MOECHAT_WORKER_START_TIMEOUT", "120"))
PROBE_CACHE_S = 30.0   # a probe may start an interpreter (vLLM's): its answer is reused this long

__all__ = ["BackendManager", "Cancelled", "CheckResult", "Event", "Generation", "LoadState", "settings_error"]


def settings_error(exc: ValidationError) -> str:
    """One sentence for settings that failed validation: each field and what is wrong with it. A
    validator's own sentence (``raise ValueError("...")``) is shown as it is, without pydantic's
    "Value error, " in front."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        parts.append(f"{where}: {msg.rstrip('.')}")
    return "Some settings are not valid. " + "; ".join(parts) + "."


def revealed(settings: BackendSettings) -> dict[str, Any]:
    """``settings`` as plain data for the worker: ``SecretStr`` values as their text (only the
    worker sees them; ``model_dump()`` keeps them masked everywhere else)."""
    from pydantic import SecretStr

    def plain(v: Any) -> Any:
        if isinstance(v, SecretStr):
            return v.get_secret_value()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return plain(settings.model_dump())


@dataclass
class CheckResult:
    """Everything decided before a load, once: the backend, the validated settings, the model
    folder read, whether the backend can run here, and the memory plan. ``refusal`` says
    whether a load with it would be refused, as the error to raise."""

    entry: BackendEntry
    settings: BackendSettings
    model: ModelInfo | None
    probe: Probe
    plan: MemoryPlan | None

    @property
    def backend(self) -> str:
        return self.entry.name

    def refusal(self, force: bool = False) -> BackendError | None:
        if not self.probe.available:
            return BackendUnavailable(f"The {self.backend} backend cannot run here: {self.probe.reason}")
        if self.plan is not None and not self.plan.fits and not force:
            return PlanDoesNotFit(plan_refusal(self.plan))
        return None

    def settings_dump(self) -> dict[str, Any]:
        """The settings as the load keeps them (secrets masked), the model as its full path."""
        out = self.settings.model_dump()
        if self.model is not None and "model" in out:
            out["model"] = self.model.path
        return out


@dataclass
class LoadState:
    status: str = "empty"  # empty | loading | ready | failed
    backend: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    model: ModelInfo | None = None
    progress: Progress | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    plan: MemoryPlan | None = None
    crashed: bool = False   # failed: the loaded backend's process died (not a failed load)

    @property
    def ready(self) -> bool:
        return self.status == "ready"


@dataclass
class Event:
    """What a generation stream yields: ``queued`` (position), ``chunk`` (text), ``done``."""

    kind: str
    text: str = ""
    tokens: int = 0  # generated tokens this chunk stands for
    position: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # with an error: context_length_exceeded, model_not_loaded, backend_crashed, backend_error
    code: str | None = None


class WorkerProcess:
    """One worker process and the connection to it. Routes messages to per-request queues."""

    def __init__(self, entry: BackendEntry, python: str | None, on_exit: Callable[[WorkerProcess], None]):
        self.entry = entry
        self.on_exit = on_exit
        self.control: Queue[P.Message | P.WorkerExited] = Queue()
        self.streams: dict[str, Queue[P.Message | P.WorkerExited]] = {}
        self.lock = threading.Lock()
        self.alive = True
        # the worker's last stderr lines: room for a crash dump of a few threads (faulthandler)
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self.expected_exit = False
        key = secrets.token_bytes(16)
        self._tmp = tempfile.mkdtemp(prefix="moechat-")
        address = os.path.join(self._tmp, "worker.sock")
        listener = Listener(address, family="AF_UNIX", authkey=key)
        cls = entry.cls
        env = dict(os.environ, MOECHAT_WORKER_KEY=key.hex(), PYTHONUNBUFFERED="1")
        module = sys.modules[cls.__module__]
        if (python or hasattr(module, "__moechat_plugin_file__")) and not cls.__module__.startswith("moechat."):
            # Another interpreter has moechat installed (it must: see docs/plugin-hooks.md) but
            # not necessarily this plugin, and a single-file plugin (MOECHAT_PLUGIN_PATHS) is
            # installed nowhere: let the worker import the plugin's module from where it lies.
            module_root = Path(module.__file__).resolve().parents[cls.__module__.count(".")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in [str(module_root), env.get("PYTHONPATH", "")] if p)
        try:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-m", "moechat.backends.worker", "--address", address,
                 "--backend", f"{cls.__module__}:{cls.__qualname__}"],
                env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
        except OSError as exc:
            listener.close()
            raise BackendError(f"The {entry.name} worker process did not start: {python or sys.executable}: "
                               f"{exc.strerror}. Check the Python interpreter the backend is set to use.") from exc
        self._stderr_pump = threading.Thread(target=self._pump_stderr, daemon=True)
        self._stderr_pump.start()
        accepted: list = []
        t = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        t.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while t.is_alive() and self.proc.poll() is None and time.monotonic() < deadline:
            t.join(0.1)
        listener.close()
        if not accepted:
            self.proc.kill()
            tail = " ".join(list(self.stderr_tail)[-3:])
            raise BackendError(f"The {entry.name} worker process did not start"
                               f"{' (' + python + ')' if python else ''}: {tail or 'no output'}")
        self.conn = accepted[0]
        self.pid = self.proc.pid
        threading.Thread(target=self._read, daemon=True, name=f"manager-reader-{entry.name}").start()

    def last_words(self, wait_s: float = 2.0) -> str:
        """What the ended worker's stderr said last: where it holds a crash dump (the worker
        enables faulthandler), the fatal error and the two innermost frames of the thread that
        crashed; else its last line."""
        self._stderr_pump.join(wait_s)   # the pipe closes once the process is gone
        lines = [line.strip() for line in self.stderr_tail if line.strip()]
        fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
        if fatal is None:
            return lines[-1] if lines else ""
        current = next((i for i in range(fatal, len(lines)) if lines[i].startswith("Current thread")), fatal)
        frames = [x for x in lines[current + 1:] if x.startswith("File ")][:2]
        return lines[fatal] + (f" ({'; '.join(frames)})" if frames else "")

    def _pump_stderr(self) -> None:
        with self.proc.stderr:
            for line in self.proc.stderr:
                line = line.rstrip()
                self.stderr_tail.append(line)
                sys.stderr.write(line + "\n")

    def _read(self) -> None:
        while True:
            try:
                msg = P.from_wire(self.conn.recv())
            except (EOFError, OSError):
                break
            except P.ProtocolError as exc:
                logger.error("{}", exc)
                continue
            if isinstance(msg, (P.ChunkOut, P.Done)):
                with self.lock:
                    q = self.streams.get(msg.id)
                if q is not None:
                    q.put(msg)
            else:
                self.control.put(msg)
        self.alive = False
        self.proc.wait()
        self.control.put(P.WorkerExited())
        # the manager's state says why before any stream ends: a request queued behind one of
        # these starts when that one ends, and must find the crash, not a loaded model
        self.on_exit(self)
        with self.lock:
            streams = list(self.streams.values())
        for q in streams:
            q.put(P.WorkerExited())

    def exit_description(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "is still running"
        if code < 0:
            import signal
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def send(self, msg: P.Message) -> None:
        try:
            self.conn.send(P.to_wire(msg))
        except (OSError, EOFError, BrokenPipeError) as exc:
            raise BackendError(f"The {self.entry.name} worker is gone ({self.exit_description()}).") from exc

    def request(self, msg: P.Message, reply: type[P.Message], timeout: float = 30):
        """Send ``msg`` and wait for the answer of type ``reply``."""
        self.send(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = self.control.get(timeout=0.2)
            except Empty:
                continue
            if isinstance(got, reply):
                return got
            if isinstance(got, P.WorkerExited):
                raise BackendError(f"The {self.entry.name} worker {self.exit_description()}.")
        raise BackendError(f"The {self.entry.name} worker did not answer {type(msg).__name__} in {timeout:.0f} s.")

    def stop(self, timeout: float = 20) -> None:
        self.expected_exit = True
        if self.proc.poll() is None:
            try:
                self.conn.send(P.to_wire(P.Unload()))
            except (OSError, EOFError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.conn.close()
        except OSError:
            pass

    def kill(self) -> None:
        self.expected_exit = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Generation:
    """A queued or running generation. Iterate it for ``Event``s; ``stop()`` ends it early."""

    def __init__(self, manager: BackendManager, request: GenerateRequest, user: str | None):
        self.manager = manager
        self.request = request
        self.user = user
        self.id = f"g{next(manager._ids)}"
        self.stopped = False
        self.started = False
        self.backend: str | None = None
        self.model: str | None = None

    def stop(self) -> None:
        self.stopped = True
        worker = self.manager._worker
        if self.started and worker is not None and worker.alive:
            try:
                worker.send(P.Cancel(self.id))
            except BackendError:
                pass
        with self.manager._turns:
            self.manager._turns.notify_all()

    def __iter__(self) -> Iterator[Event]:
        return self.manager._run(self)


class BackendManager:
    """Owns the one loaded backend. Thread-safe; every public method may be called from any thread."""

    def __init__(self, plugins: Plugins, data_dir: Path | None = None):
        self.plugins = plugins
        self.data_dir = data_dir or machine.data_dir()
        self.state = LoadState()
        self._worker: WorkerProcess | None = None
        self._ids = itertools.count(1)
        self._turns = threading.Condition()
        self._queue: deque[str] = deque()
        self._load_lock = threading.Lock()
        self._cancel_load = threading.Event()
        self.history: deque[dict[str, Any]] = deque(maxlen=50)
        self.memory_log: dict[str, Any] = {}
        self._stats_lock = threading.Lock()
        self._on_progress: Callable[[Progress], None] | None = None
        self._probes: dict[tuple[str, str], tuple[float, Probe]] = {}
        self._probe_lock = threading.Lock()

    # ---- listing ------------------------------------------------------------------------
    def backends(self) -> dict[str, BackendEntry]:
        return self.plugins.backends()

    def listing(self) -> list[dict[str, Any]]:
        """``Plugins.listing`` with this manager's cached probes."""
        return self.plugins.listing(probe=self.probe)

    def suggest(self, model: ModelInfo) -> str | None:
        return self.plugins.pm.hook.suggest_backend(model=model)

    # ---- loading ------------------------------------------------------------------------
    def resolve_model(self, folder: str, *, weights: bool = True) -> ModelInfo:
        """The ModelInfo of ``folder`` (or of a model file a plugin reads); the demo model (created
        on first use) when empty. ``weights=False`` (a plan only): a folder with config.json alone will do."""
        from moechat.backends import synthetic
        if synthetic.is_synthetic(folder):
            return synthetic.model_info(folder)
        if not folder:
            from moechat.backends.demo import is_demo
            demo = self.data_dir / "demo-model"
            if not is_demo(demo):
                self._set_progress(Progress("Creating the demo model (first run only)"))
                subprocess.run(
                    [sys.executable, "-c", "import sys; from pathlib import Path; from moechat.backends.demo import "
                     "demo_model_dir; demo_model_dir(Path(sys.argv[1]))", str(self.data_dir)],
                    check=True, capture_output=True,
                )
            folder = str(demo)
        elif (info := self.plugins.pm.hook.inspect_model(path=folder)) is not None:
            return info  # a format a plugin reads (a GGUF file, say)
        return inspect(folder, weights=weights)

    def probe(self, entry: BackendEntry, settings: BackendSettings | None = None) -> Probe:
        """``entry``'s probe for ``settings``, reused for ``PROBE_CACHE_S`` seconds (a probe may
        start another interpreter)."""
        key = (entry.name, json.dumps(revealed(settings), sort_keys=True, default=str) if settings else "")
        now = time.monotonic()
        with self._probe_lock:
            cached = self._probes.get(key)
            if cached is not None and now - cached[0] < PROBE_CACHE_S:
                return cached[1]
        result = entry.probe(settings)
        with self._probe_lock:
            self._probes[key] = (now, result)
        return result

    def parse_settings(self, backend: str, settings: dict[str, Any] | None) -> tuple[BackendEntry, BackendSettings]:
        """The first, cheap part of ``check``: find ``backend`` and validate ``settings`` against
        its schema (no folder read, no probe). Raises BackendError / SettingsInvalid."""
        backends = self.backends()
        entry = backends.get(backend)
        if entry is None:
            raise BackendError(f"There is no backend named {backend!r}. Installed: {', '.join(sorted(backends))}.")
        try:
            return entry, entry.cls.Settings.model_validate(dict(settings or {}))
        except ValidationError as exc:
            raise SettingsInvalid(settings_error(exc)) from exc

    def check(self, backend: str, settings: dict[str, Any] | None = None, *, on_machine: Any = None,
              weights: bool = True) -> CheckResult:
        """Everything a load decides before it unloads anything, done once: find ``backend``,
        validate ``settings``, read the model folder, ask the backend's own ``check``, probe
        (cached) and plan (for ``on_machine``, default this machine; ``weights=False`` for a plan
        alone: the model folder may hold only config.json). Raises BackendError (a
        ``SettingsInvalid``, a ``ModelFolderError``, ...) with a sentence; whether the backend can
        run here and whether the plan fits are in the result (``refusal``)."""
        entry, parsed = self.parse_settings(backend, settings)
        cls = entry.cls
        model = self.resolve_model(getattr(parsed, "model", ""), weights=weights) if cls.needs_model else None
        try:
            cls.check(parsed, model)
        except ValidationError as exc:
            raise SettingsInvalid(settings_error(exc)) from exc
        except BackendError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).error("the settings check of {} raised", backend)
            raise SettingsInvalid(f"The {backend} backend's settings check failed: {type(exc).__name__}: {exc}") from exc
        plan = cls.plan(model, parsed, on_machine if on_machine is not None else machine.this_machine())
        return CheckResult(entry, parsed, model, self.probe(entry, parsed), plan)

    def load(self, backend: str, settings: dict[str, Any] | None = None, *,
             on_progress: Callable[[Progress], None] | None = None, force: bool = False,
             user: str | None = None, checked: CheckResult | None = None) -> dict[str, Any]:
        """Unload whatever is loaded, then load ``backend`` with ``settings``. Blocks until the
        model is ready; raises BackendError with a sentence on any failure. A refused load
        (``check`` or its ``refusal``) leaves what is loaded now in place. ``checked``: the
        result of ``check`` the caller already has, reused instead of checking again. Waits its
        turn behind generations already queued."""
        try:
            result = checked if checked is not None and checked.backend == backend else self.check(backend, settings)
            if (refusal := result.refusal(force)) is not None:
                raise refusal
        except BackendError as exc:
            logger.warning("load of {} refused: {}", backend, exc)
            self.plugins.emit("load_failed", backend=backend, error=str(exc), user=user)
            raise
        with self._load_lock:
            self._cancel_load.clear()
            ticket = self._enqueue(f"load-{next(self._ids)}")
            try:
                self._wait_turn(ticket, lambda: self._cancel_load.is_set())
                return self._load_locked(result, on_progress, user)
            finally:
                self._release(ticket)

    def _load_locked(self, checked: CheckResult, on_progress, user) -> dict[str, Any]:
        entry, model, plan = checked.entry, checked.model, checked.plan
        self._on_progress = on_progress
        settings = checked.settings_dump()
        self.plugins.emit("load_started", backend=entry.name, settings=settings, user=user)
        self._unload_locked()
        self.state = LoadState(status="loading", backend=entry.name, settings=settings, model=model,
                               plan=plan, progress=Progress("Starting the worker process"))
        try:
            self.memory_log = {"before_load": memory_snapshot()}
            if self._cancel_load.is_set():
                raise Cancelled("Loading was cancelled.")
            worker = WorkerProcess(entry, entry.cls.worker_python(checked.settings), self._worker_exited)
            self._worker = worker
            wire = revealed(checked.settings)
            if model is not None and "model" in wire:
                wire["model"] = model.path
            worker.send(P.Load(wire))
            info = self._await_loaded(worker)
        except BackendError as exc:
            self._fail_load(entry.name, str(exc))
            raise
        except Exception as exc:
            logger.exception("load of {} failed", entry.name)
            self._fail_load(entry.name, f"Loading failed: {type(exc).__name__}: {exc}")
            raise BackendError(self.state.error) from exc
        info.setdefault("model_name", Path(model.path).name if model else entry.name)
        from moechat.backends.planning import check_after_load
        if (plan_check := check_after_load(plan, info)):
            info["plan_check"] = plan_check
            logger.warning("{}", plan_check)
        self.state = LoadState(status="ready", backend=entry.name, settings=settings, model=model,
                               info=info, plan=plan)
        self.plugins.emit("load_finished", backend=entry.name, info=info, user=user)
        logger.info("{} loaded {} in {:.1f} s", entry.name, model.path if model else "", info.get("load_time_s", 0))
        return info

    def _await_loaded(self, worker: WorkerProcess) -> dict[str, Any]:
        while True:
            if self._cancel_load.is_set():
                worker.kill()
                raise Cancelled("Loading was cancelled.")
            try:
                msg = worker.control.get(timeout=0.2)
            except Empty:
                continue
            if isinstance(msg, P.LoadProgress):
                self._set_progress(Progress(msg.stage, msg.done, msg.total, msg.unit))
            elif isinstance(msg, P.Loaded):
                return msg.info
            elif isinstance(msg, P.LoadFailed):
                worker.stop()
                raise error_of(msg.code, msg.message)
            elif isinstance(msg, P.WorkerExited):
                if self._cancel_load.is_set():
                    raise Cancelled("Loading was cancelled.")
                tail = worker.last_words()
                raise BackendError(f"The {worker.entry.name} worker {worker.exit_description()} while "
                                   f"loading{': ' + tail if tail else ''}. Check the settings and load again.")

    def _set_progress(self, progress: Progress) -> None:
        self.state.progress = progress
        cb = self._on_progress
        if cb is not None:
            try:
                cb(progress)
            except Exception:
                logger.exception("progress callback failed")

    def _fail_load(self, backend: str, message: str) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None
        model, plan = self.state.model, self.state.plan
        self.state = LoadState(status="failed", backend=backend, error=message, model=model, plan=plan)
        logger.error("load of {} failed: {}", backend, message)
        self.plugins.emit("load_failed", backend=backend, error=message)

    def cancel_load(self) -> None:
        """Stop a load in progress; the worker is killed, nothing stays half-loaded."""
        self._cancel_load.set()
        with self._turns:
            self._turns.notify_all()

    def unload(self) -> None:
        with self._load_lock:
            ticket = self._enqueue(f"unload-{next(self._ids)}")
            try:
                self._wait_turn(ticket, lambda: False)
                self._unload_locked()
            finally:
                self._release(ticket)

    def _unload_locked(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        name = worker.entry.name
        worker.stop()
        self.memory_log["after_unload"] = memory_snapshot()
        self.memory_log["worker_exited"] = worker.proc.poll() is not None
        self.state = LoadState()
        self.plugins.emit("unloaded", backend=name, memory=self.memory_log)

    def _worker_exited(self, worker: WorkerProcess) -> None:
        if worker.expected_exit or self._worker is not worker:
            return
        message = (f"The {worker.entry.name} backend process {worker.exit_description()}. "
                   "Your chats are kept; load the model again to continue.")
        # its last words go to the log only: the page's sentence reaches every user on the LAN
        logger.error("{} Its last words: {}", message, worker.last_words(wait_s=0.5) or "none")
        self._worker = None
        self.state = LoadState(status="failed", backend=worker.entry.name, error=message,
                               model=self.state.model, settings=self.state.settings, crashed=True)
        self.plugins.emit("worker_crashed", backend=worker.entry.name, message=message)

    # ---- generation -----------------------------------------------------------------------
    def generate(self, request: GenerateRequest, user: str | None = None) -> Generation:
        return Generation(self, request, user)

    def _enqueue(self, ticket: str) -> str:
        with self._turns:
            self._queue.append(ticket)
        return ticket

    def _release(self, ticket: str) -> None:
        with self._turns:
            if ticket in self._queue:
                self._queue.remove(ticket)
            self._turns.notify_all()

    def _wait_turn(self, ticket: str, cancelled: Callable[[], bool]) -> None:
        with self._turns:
            while self._queue[0] != ticket:
                if cancelled():
                    raise Cancelled("Cancelled while waiting in the queue.")
                self._turns.wait(0.5)
            if cancelled():
                raise Cancelled("Cancelled while waiting in the queue.")

    def queue_length(self) -> int:
        """Generations, loads and unloads waiting or running."""
        with self._turns:
            return len(self._queue)

    def _run(self, gen: Generation) -> Iterator[Event]:
        ticket = self._enqueue(gen.id)
        try:
            reported = 0
            while True:
                with self._turns:
                    position = self._queue.index(ticket)
                    if position and position == reported and not gen.stopped:
                        self._turns.wait(0.5)
                        continue
                if gen.stopped:
                    yield Event("done", finish_reason="cancelled")
                    return
                if position == 0:
                    break
                reported = position
                yield Event("queued", position=position)
            worker = self._worker
            if worker is None or not worker.alive or not self.state.ready:
                yield Event("done", finish_reason="error", error=self.not_ready_message(),
                            code="model_loading" if self.state.status == "loading" else "model_not_loaded")
                return
            gen.backend = self.state.backend
            gen.model = self.state.info.get("model_name")
            yield from self._stream(worker, gen)
        finally:
            self._release(ticket)

    def not_ready_message(self) -> str:
        if self.state.status == "loading":
            return "The model is still loading; send again when it is ready."
        if self.state.status == "failed" and self.state.error:
            if self.state.crashed:
                return f"No model is loaded. {self.state.error}"
            return f"No model is loaded. The last load failed: {self.state.error}"
        return "No model is loaded. Choose a backend and a model folder, then press Load."

    def _stream(self, worker: WorkerProcess, gen: Generation) -> Iterator[Event]:
        q: Queue[P.Message | P.WorkerExited] = Queue()
        with worker.lock:
            worker.streams[gen.id] = q
        if not worker.alive:   # it died after the check in _run: its reader may have passed this stream
            q.put(P.WorkerExited())
        finished = False
        try:
            gen.started = True
            try:
                worker.send(P.Generate(gen.id, gen.request.model_dump()))
                if gen.stopped:
                    worker.send(P.Cancel(gen.id))
            except BackendError:
                pass   # the connection is gone: its reader ends this stream with WorkerExited
            while True:
                msg = q.get()
                if isinstance(msg, P.ChunkOut):
                    yield Event("chunk", text=msg.text, tokens=msg.tokens)
                elif isinstance(msg, P.Done):
                    usage = dict(msg.usage, backend=gen.backend, model=gen.model)
                    self.history.append(usage)
                    self.plugins.emit("generation_finished", backend=gen.backend, user=gen.user,
                                      finish_reason=msg.finish_reason, usage=usage)
                    finished = True
                    yield Event("done", finish_reason=msg.finish_reason, usage=usage, error=msg.error,
                                code=msg.code)
                    return
                elif isinstance(msg, P.WorkerExited):
                    finished = True
                    yield Event("done", finish_reason="error", code="backend_crashed", error=(
                        f"The {worker.entry.name} backend process {worker.exit_description()} while "
                        "generating. What was written so far is kept; load the model again to continue."))
                    return
        except GeneratorExit:
            if worker.alive and not finished:
                try:
                    worker.send(P.Cancel(gen.id))
                except BackendError:
                    pass
                # wait for the worker to finish this request so the next one starts clean
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        if isinstance(q.get(timeout=0.5), (P.Done, P.WorkerExited)):
                            break
                    except Empty:
                        if not worker.alive:
                            break
            raise
        finally:
            with worker.lock:
                worker.streams.pop(gen.id, None)

    # ---- stats ------------------------------------------------------------------------------
    def stats(self, timeout: float = 10) -> dict[str, Any]:
        """Load facts, the last generation's timing, the backend's own keys and memory."""
        out: dict[str, Any] = {"status": self.state.status, "backend": self.state.backend}
        if self.state.model is not None:
            out["model"] = self.state.model.path
        if self.state.status == "loading" and self.state.progress is not None:
            out["progress"] = self.state.progress.__dict__
        if self.state.error:
            out["error"] = self.state.error
        if self.history:
            out["last"] = dict(self.history[-1])
        out["queue_length"] = self.queue_length()
        out["load"] = {k: v for k, v in self.state.info.items() if k not in ("gpus", "worker_rss_bytes")}
        out["memory"] = self.memory_log
        worker = self._worker
        if worker is not None and worker.alive and self.state.ready:
            out["worker_pid"] = worker.pid
            try:
                out["backend_stats"] = self.worker_stats(worker, timeout)
            except BackendError as exc:
                out["backend_stats_error"] = str(exc)
        return out

    def worker_stats(self, worker: WorkerProcess, timeout: float) -> dict[str, Any]:
        with self._stats_lock:
            return worker.request(P.StatsRequest(), P.StatsReply, timeout).stats

    def perplexity(self, text: str, timeout: float = 300) -> float:
        """The loaded model's perplexity on ``text`` (see ``Backend.perplexity``). Raises
        NotImplementedError when the backend cannot score text, BackendError otherwise."""
        worker = self._worker
        if worker is None or not worker.alive or not self.state.ready:
            raise BackendError(self.not_ready_message())
        with self._stats_lock:
            reply = worker.request(P.PerplexityRequest(text), P.PerplexityReply, timeout)
        if reply.unsupported:
            raise NotImplementedError(f"the {worker.entry.name} backend cannot score text")
        if reply.error:
            raise BackendError(reply.error)
        return reply.value

    def close(self) -> None:
        self.cancel_load()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(timeout=10)


def memory_snapshot() -> dict[str, Any]:
    m = machine.this_machine()
    return {"host_available_bytes": m.host_available,
            "gpus": [{"index": g.index, "used_bytes": g.used, "total_bytes": g.total} for g in m.gpus]}


def plan_refusal(plan: MemoryPlan) -> str:
    from moechat.backends.planning import describe
    return describe(plan) + " Change the settings as advised, or load anyway with force."
