"""The plugin manager: built-in plugins, entry-point plugins, and the registry of named factories."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pluggy

from balancer import hookspecs
from balancer.config import Config
from balancer.errors import PluginError
from balancer.hookspecs import ReplicationStrategy, Storage, Transport

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "Registry", "plugin_manager"]

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
)
"""Modules registered as plugins in every plugin manager, exactly like entry-point plugins."""

T = TypeVar("T")


def plugin_manager(*, load_entrypoints: bool = True, plugins: Iterable[object] = ()) -> pluggy.PluginManager:
    """A new plugin manager with balancer's hooks, the built-in plugins, ``plugins``, and (optionally)
    the entry-point plugins.

    Raises :class:`PluginError` naming the plugin if one implements a hook that does not exist.
    """
    pm = pluggy.PluginManager("balancer")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    for plugin in plugins:
        pm.register(plugin)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc), plugin=exc.plugin) from exc
    return pm


@dataclass
class _Named(Generic[T]):
    kind: str
    factories: dict[str, Callable[[Config], T]] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[[Config], T]) -> None:
        # Built-ins register last (trylast), so the first registration of a name is the user's and wins.
        self.factories.setdefault(name, factory)

    def create(self, name: str, config: Config) -> T:
        try:
            factory = self.factories[name]
        except KeyError:
            known = ", ".join(sorted(self.factories)) or "none"
            raise PluginError(f"no {self.kind} named {name!r}; available: {known}") from None
        return factory(config)


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

    def emit(self, event: str, **kwargs: Any) -> None:
        """Call the event hook ``balancer_<event>`` with ``kwargs``."""
        getattr(self.pm.hook, f"balancer_{event}")(**kwargs)
