"""Finding plugins: entry points of the ``moechat.backends`` group, each loaded on its own.

A plugin that fails to import, or whose ``register_backends`` raises, is logged (once) and
listed with its error; it never stops the app. ``MOECHAT_PLUGINS`` (comma-separated entry-point
names) limits which plugins load; ``MOECHAT_DISABLE_PLUGINS`` drops some.
``MOECHAT_PLUGIN_PATHS`` (paths separated by the OS path separator) loads single-file plugins
without packaging them, for development: each ``.py`` file is a plugin named after the file.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import pluggy
from loguru import logger

from moechat.backends import hookspecs
from moechat.backends.api import Backend, Probe

GROUP = "moechat.backends"
ALLOW_ENV = "MOECHAT_PLUGINS"
DENY_ENV = "MOECHAT_DISABLE_PLUGINS"
PATHS_ENV = "MOECHAT_PLUGIN_PATHS"


@dataclass
class PluginFailure:
    plugin: str
    error: str


@dataclass
class BackendEntry:
    name: str
    cls: type[Backend]
    plugin: str

    @property
    def label(self) -> str:
        return self.cls.label or self.name

    def probe(self, settings: object | None = None) -> Probe:
        try:
            if settings is not None and len(inspect.signature(self.cls.probe).parameters) >= 1:
                return self.cls.probe(settings)
            return self.cls.probe()  # also plugins written before probes took settings
        except Exception as exc:  # a probe must not take the listing down
            logger.opt(exception=exc).warning("probe of {} raised", self.name)
            return Probe(False, f"its availability check failed: {exc}")


@dataclass
class Distribution:
    """Where a plugin comes from: its distribution's name and version, or the file it was
    loaded from (``MOECHAT_PLUGIN_PATHS``, version empty)."""

    name: str
    version: str = ""


@dataclass
class Plugins:
    """The plugin manager plus what loading it found: failures, the distribution of each plugin,
    and names in ``MOECHAT_PLUGINS`` that match no installed plugin."""

    pm: pluggy.PluginManager
    failures: list[PluginFailure] = field(default_factory=list)
    distributions: dict[str, Distribution] = field(default_factory=dict)
    unmatched_allowed: list[str] = field(default_factory=list)

    def backends(self) -> dict[str, BackendEntry]:
        found: dict[str, BackendEntry] = {}
        for plugin in self.pm.get_plugins():
            impl = getattr(plugin, "register_backends", None)
            if impl is None:
                continue
            plugin_name = self.pm.get_name(plugin) or repr(plugin)

            def register(cls: type[Backend], _plugin: str = plugin_name) -> None:
                if not (isinstance(cls, type) and issubclass(cls, Backend)):
                    raise TypeError(f"register() takes a Backend subclass, got {cls!r}")
                if cls.name in found:
                    logger.warning("backend {!r} from plugin {} is already registered by {}; ignored",
                                   cls.name, _plugin, found[cls.name].plugin)
                    return
                found[cls.name] = BackendEntry(cls.name, cls, _plugin)

            try:
                impl(register=register)
            except Exception as exc:
                if self._fail(plugin_name, f"register_backends raised {type(exc).__name__}: {exc}"):
                    logger.error("plugin {} failed to register its backends: {}", plugin_name, exc)
                    logger.opt(exception=exc).debug("traceback of plugin {}", plugin_name)
        return found

    def listing(self, probe: Callable[[BackendEntry], Probe] | None = None) -> list[dict]:
        """Every backend with whether it can run here and why not, for `moechat plugins`,
        ``GET /v1/models`` and the page. ``probe``: how to probe an entry (the manager's cached
        probe), default a fresh probe."""
        rows = []
        for name, entry in sorted(self.backends().items()):
            probe_result = probe(entry) if probe is not None else entry.probe()
            dist = self.distributions.get(entry.plugin, Distribution(""))
            rows.append({"name": name, "label": entry.label, "plugin": entry.plugin,
                         "distribution": dist.name, "version": dist.version,
                         "available": probe_result.available, "reason": probe_result.reason})
        return rows

    def backend(self, name: str) -> BackendEntry:
        backends = self.backends()
        if name not in backends:
            known = ", ".join(sorted(backends)) or "none"
            raise KeyError(f"No backend named {name!r}. Installed backends: {known}.")
        return backends[name]

    def model_file_suffixes(self) -> tuple[str, ...]:
        """Endings of the single-file models plugins read (``.gguf``), for the model picker."""
        return tuple(sorted({s.lower() for found in self.pm.hook.model_file_suffixes() for s in found or ()}))

    def emit(self, name: str, **data) -> None:
        """Send an event to every plugin's ``moechat_event``; a failing observer is logged."""
        for impl in self.pm.hook.moechat_event.get_hookimpls():
            try:
                impl.function(name=name, data=data)
            except Exception as exc:
                logger.opt(exception=exc).warning("plugin {} failed on event {}", impl.plugin_name, name)

    def _fail(self, plugin: str, error: str) -> bool:
        """Record a failure; True the first time (log it then), False when already known."""
        if any(f.plugin == plugin and f.error == error for f in self.failures):
            return False
        self.failures.append(PluginFailure(plugin, error))
        return True


def _names_from_env(var: str) -> set[str] | None:
    raw = os.environ.get(var, "").strip()
    return {n.strip() for n in raw.split(",") if n.strip()} if raw else None


def get_plugin_manager(extra_plugins: list[object] = ()) -> Plugins:
    """A fresh plugin manager with every allowed ``moechat.backends`` entry point loaded, then
    the files named in ``MOECHAT_PLUGIN_PATHS``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    allow, deny = _names_from_env(ALLOW_ENV), _names_from_env(DENY_ENV) or set()
    found = sorted(entry_points(group=GROUP), key=lambda e: e.name)
    for ep in found:
        if (allow is not None and ep.name not in allow) or ep.name in deny:
            continue
        if pm.has_plugin(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        plugins.distributions[ep.name] = Distribution(dist.name, dist.version) if dist else Distribution("")
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:
            logger.error("plugin {} ({}) failed to load: {}: {}", ep.name, ep.value, type(exc).__name__, exc)
            logger.opt(exception=exc).debug("traceback of plugin {}", ep.name)
            plugins._fail(ep.name, f"failed to load {ep.value}: {type(exc).__name__}: {exc}")
    for path in _paths_from_env():
        _load_file_plugin(plugins, path, allow, deny)
    if allow is not None:
        known = {ep.name for ep in found} | set(plugins.distributions)
        plugins.unmatched_allowed = sorted(allow - known)
        if plugins.unmatched_allowed:
            logger.warning("{} names {}, which match no installed plugin; installed: {}.", ALLOW_ENV,
                           ", ".join(plugins.unmatched_allowed), ", ".join(sorted(known)) or "none")
    for extra in extra_plugins:
        pm.register(extra)
    pm.check_pending()
    return plugins


def _paths_from_env() -> list[Path]:
    raw = os.environ.get(PATHS_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def _load_file_plugin(plugins: Plugins, path: Path, allow: set[str] | None, deny: set[str]) -> None:
    """Load one single-file plugin (``MOECHAT_PLUGIN_PATHS``), named after the file. Its module
    is importable by that name, so the worker process (given the file's folder on PYTHONPATH by
    the manager) imports the same backend class."""
    name = path.stem
    if (allow is not None and name not in allow) or name in deny or plugins.pm.has_plugin(name):
        return
    plugins.distributions[name] = Distribution(str(path))
    try:
        if path.suffix != ".py" or not path.is_file():
            raise FileNotFoundError(f"{path} is not a .py file ({PATHS_ENV} lists single-file plugins)")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        module.__moechat_plugin_file__ = str(path)   # the worker imports it from its folder
        sys.modules[name] = module
        spec.loader.exec_module(module)
        plugins.pm.register(module, name=name)
    except Exception as exc:
        sys.modules.pop(name, None)
        logger.error("plugin file {} failed to load: {}: {}", path, type(exc).__name__, exc)
        logger.opt(exception=exc).debug("traceback of plugin {}", name)
        plugins._fail(name, f"failed to load {path}: {type(exc).__name__}: {exc}")
