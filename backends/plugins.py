"""Finding plugins: entry points of the ``moechat.backends`` group, each loaded on its own.

A plugin that fails to import, or whose ``register_backends`` raises, is logged and listed
with its error; it never stops the app. ``MOECHAT_PLUGINS`` (comma-separated entry-point
names) limits which plugins load; ``MOECHAT_DISABLE_PLUGINS`` drops some.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import pluggy
from loguru import logger

from moechat.backends import hookspecs
from moechat.backends.api import Backend, Probe

GROUP = "moechat.backends"
ALLOW_ENV = "MOECHAT_PLUGINS"
DENY_ENV = "MOECHAT_DISABLE_PLUGINS"


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
class Plugins:
    """The plugin manager plus what loading it found."""

    pm: pluggy.PluginManager
    failures: list[PluginFailure] = field(default_factory=list)

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
                logger.error("plugin {} failed to register its backends: {}", plugin_name, exc)
                logger.opt(exception=exc).debug("traceback of plugin {}", plugin_name)
                self._fail(plugin_name, f"register_backends raised {type(exc).__name__}: {exc}")
        return found

    def listing(self) -> list[dict]:
        """Every backend with whether it can run here and why not, for `moechat plugins`,
        ``GET /v1/models`` and the page."""
        rows = []
        for name, entry in sorted(self.backends().items()):
            probe = entry.probe()
            rows.append({"name": name, "label": entry.label, "plugin": entry.plugin,
                         "available": probe.available, "reason": probe.reason})
        return rows

    def backend(self, name: str) -> BackendEntry:
        backends = self.backends()
        if name not in backends:
            known = ", ".join(sorted(backends)) or "none"
            raise KeyError(f"No backend named {name!r}. Installed backends: {known}.")
        return backends[name]

    def emit(self, name: str, **data) -> None:
        """Send an event to every plugin's ``moechat_event``; a failing observer is logged."""
        for impl in self.pm.hook.moechat_event.get_hookimpls():
            try:
                impl.function(name=name, data=data)
            except Exception as exc:
                logger.opt(exception=exc).warning("plugin {} failed on event {}", impl.plugin_name, name)

    def _fail(self, plugin: str, error: str) -> None:
        if not any(f.plugin == plugin and f.error == error for f in self.failures):
            self.failures.append(PluginFailure(plugin, error))


def _names_from_env(var: str) -> set[str] | None:
    raw = os.environ.get(var, "").strip()
    return {n.strip() for n in raw.split(",") if n.strip()} if raw else None


def get_plugin_manager(extra_plugins: list[object] = ()) -> Plugins:
    """A fresh plugin manager with every allowed ``moechat.backends`` entry point loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = Plugins(pm)
    allow, deny = _names_from_env(ALLOW_ENV), _names_from_env(DENY_ENV) or set()
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if (allow is not None and ep.name not in allow) or ep.name in deny:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:
            logger.error("plugin {} ({}) failed to load: {}: {}", ep.name, ep.value, type(exc).__name__, exc)
            logger.opt(exception=exc).debug("traceback of plugin {}", ep.name)
            plugins._fail(ep.name, f"failed to load {ep.value}: {type(exc).__name__}: {exc}")
    for extra in extra_plugins:
        pm.register(extra)
    pm.check_pending()
    return plugins
