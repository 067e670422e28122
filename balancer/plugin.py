"""The plugin manager: built-in plugins, entry-point plugins, and the registry of named factories."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from balancer import hookspecs
from balancer.config import Config
from balancer.errors import PluginError
from balancer.hookspecs import ReplicationStrategy, Storage, Transport

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "Registry",
    "import_plugins",
    "installed_plugins",
    "plugin_manager",
]

ENTRY_POINT_GROUP = "balancer"
"""Third-party packages register plugins under this entry-point group."""

DEFAULT_PLUGINS = (
    "balancer.plugins.aiohttp_transport",
    "balancer.plugins.local_transport",
    "balancer.plugins.stream_transport",
    "balancer.plugins.memory_storage",
    "balancer.plugins.sqlite_storage",
    "balancer.plugins.replication",
    "balancer.plugins.repl",
    "balancer.plugins.ui",
)
"""Modules registered as plugins in every plugin manager, exactly like entry-point plugins."""

T = TypeVar("T")


def plugin_manager(
    *, load_entrypoints: bool = True, plugins: Iterable[object] = (), disabled: Iterable[str] = ()
) -> pluggy.PluginManager:
    """A new plugin manager with balancer's hooks, the built-in plugins, ``plugins``, and (optionally)
    the entry-point plugins except those named in ``disabled``.

    Raises :class:`PluginError`, with a one-line message naming the plugin, if one fails to import,
    implements a hook that does not exist or with the wrong arguments, or implements one with
    ``async def`` (hooks are called synchronously: an async one would never run).
    """
    pm = pluggy.PluginManager("balancer")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        _register(pm, importlib.import_module(name), name)
    for plugin in plugins:
        _register(pm, plugin, None)
    if load_entrypoints:
        _load_entrypoints(pm, set(disabled))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {pm.get_name(exc.plugin)!r}: {_line(exc)}", plugin=exc.plugin) from exc
    return pm


def installed_plugins() -> dict[str, str]:
    """The entry-point plugins installed in this environment: name -> the package that provides it."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.dist.name if ep.dist is not None else ep.value for ep in found}


def _load_entrypoints(pm: pluggy.PluginManager, disabled: set[str]) -> None:
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    unknown = disabled - {ep.name for ep in installed}
    if unknown:
        known = ", ".join(sorted(installed_plugins())) or "none"
        raise PluginError(f"no installed plugin named {', '.join(sorted(unknown))}; installed: {known}")
    failed: list[str] = []  # every plugin that fails to import, named in the one error
    for ep in installed:
        if ep.name in disabled or pm.get_plugin(ep.name) is not None:
            continue
        package = ep.dist.name if ep.dist is not None else ep.value
        try:
            plugin = ep.load()
        except Exception as exc:  # any error of a third party's import is reported alike
            failed.append(
                f"plugin {ep.name!r} (package {package}) failed to load: {type(exc).__name__}: {_line(exc)}"
            )
            continue
        _register(pm, plugin, ep.name, package)
    if failed:
        names = " ".join(f"--disable-plugin {name.split(chr(39))[1]}" for name in failed)
        raise PluginError(f"{'; '.join(failed)}; start without: {names} (or --no-plugins)")


def import_plugins(modules: Iterable[str]) -> list[object]:
    """Import plugin modules by name (``--plugin MODULE``): a plugin need not be an installed package.
    Raises :class:`PluginError` naming a module that fails to import."""
    imported: list[object] = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except Exception as exc:  # any error of the module's import is reported alike
            raise PluginError(
                f"plugin module {name!r} failed to load: {type(exc).__name__}: {_line(exc)}"
            ) from exc
    return imported


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None, package: str | None = None) -> None:
    """Register ``plugin``, refusing hooks that do not match their specification or are async."""
    label = repr(name or getattr(plugin, "__name__", None) or type(plugin).__name__)
    if package:
        label += f" (package {package})"
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {label}: {_line(exc)}", plugin=plugin) from exc
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and (
                inspect.iscoroutinefunction(impl.function) or inspect.isasyncgenfunction(impl.function)
            ):
                pm.unregister(plugin)
                raise PluginError(
                    f"plugin {label}: hook {caller.name} is async def, but hooks are called synchronously "
                    "(it would never run); make it a plain def that starts its work elsewhere",
                    plugin=plugin,
                )


def _line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass
class _Named(Generic[T]):
    kind: str
    factories: dict[str, Callable[[Config], T]] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[[Config], T]) -> None:
        # Built-ins register last (trylast), so the first registration of a name is the user's and wins.
        self.factories.setdefault(name, factory)

    def check(self, name: str) -> None:
        if name not in self.factories:
            known = ", ".join(sorted(self.factories)) or "none"
            raise PluginError(f"no {self.kind} named {name!r}; available: {known}")

    def create(self, name: str, config: Config) -> T:
        self.check(name)
        made = self.factories[name](config)
        if inspect.isawaitable(made):  # an async factory: its object would never exist
            if inspect.iscoroutine(made):
                made.close()
            raise PluginError(f"the {self.kind} factory {name!r} is async; it must return the object itself")
        return made


class Registry:
    """Every transport, storage and replication strategy the plugins registered, by name."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.transports = _Named[Transport]("transport")
        self.storages = _Named[Storage]("storage")
        self.replications = _Named[ReplicationStrategy]("replication strategy")
        pm.hook.balancer_register_transports(register=self.transports.register)
        pm.hook.balancer_register_storages(register=self.storages.register)
        pm.hook.balancer_register_replications(register=self.replications.register)

    def transport(self, config: Config) -> Transport:
        """A new transport of the kind ``config.transport`` names; :class:`PluginError` if none is."""
        return self.transports.create(config.transport, config)

    def storage(self, config: Config) -> Storage:
        """A new storage of the kind ``config.storage`` names; :class:`PluginError` if none is."""
        return self.storages.create(config.storage, config)

    def replication(self, config: Config) -> ReplicationStrategy:
        """The strategy ``config.replication`` names; :class:`PluginError` if none is."""
        return self.replications.create(config.replication, config)

    def check(self, config: Config) -> None:
        """Raise :class:`PluginError` if a plugin ``config`` names is not registered (listing those that
        are), or a :class:`~balancer.errors.ConfigError` if the replication strategy refuses its settings.
        """
        self.transports.check(config.transport)
        self.storages.check(config.storage)
        self.replication(config)

    def emit(self, event: str, **kwargs: Any) -> None:
        """Call the event hook ``balancer_<event>`` with ``kwargs``."""
        getattr(self.pm.hook, f"balancer_{event}")(**kwargs)
