"""The contract between balancer's core and its plugins: hook specifications and the seams they fill.

pluggy calls hooks synchronously, so hooks only register factories or answer small questions; every
piece of I/O lives in the async objects the factories return (a :class:`Transport`, a :class:`Storage`).
Never write an ``async def`` hookimpl.

A plugin is any module or object with ``@hookimpl`` functions, registered by the plugin manager
(:func:`balancer.plugin.plugin_manager`) from ``balancer/plugins/`` or from the ``balancer`` entry-point
group. Built-in plugins mark their hooks ``trylast`` so that a user's plugin registering the same name
wins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import pluggy

from balancer.keyspace import KeySpace
from balancer.types import Member, NodeInfo, Record

if TYPE_CHECKING:
    import click

    from balancer.config import Config
    from balancer.node import Node

__all__ = [
    "Handler",
    "PublicApi",
    "ReplicationStrategy",
    "Route",
    "Storage",
    "StorageFactory",
    "Transport",
    "TransportFactory",
    "hookimpl",
    "hookspec",
]

hookspec = pluggy.HookspecMarker("balancer")
"""Marks a function in this module as a hook specification."""
hookimpl = pluggy.HookimplMarker("balancer")
"""Marks a plugin's function as the implementation of a hook."""

Payload = dict[str, Any]
Handler = Callable[[Payload], Awaitable[Payload]]
"""An RPC handler: JSON-safe payload in, JSON-safe result out, or a BalancerError raised."""


@dataclass(frozen=True, slots=True)
class Route:
    """An extra HTTP endpoint a plugin serves on every node (``GET /metrics``, say).

    ``handler()`` returns ``(status, content type, body)``; transports without HTTP ignore routes. With an
    API token set, the endpoint needs it as ``/status`` does (Prometheus sends one with ``authorization``).
    """

    method: str
    path: str
    handler: Callable[[], Awaitable[tuple[int, str, bytes]]]


class PublicApi(ABC):
    """What a node offers its clients: the key-value operations and its status, by key text."""

    def routes(self) -> list[Route]:
        """Extra HTTP endpoints to serve beside the key-value API (none by default)."""
        return []

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """The value of ``key``; raises :class:`~balancer.errors.KeyNotFoundError`."""

    @abstractmethod
    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key``; raises :class:`~balancer.errors.KeyNotFoundError` if it has no live value."""

    @abstractmethod
    async def status(self) -> Payload:
        """The node's view of the ring and its key count, as JSON-safe data."""

    async def ring_view(self) -> Payload:
        """Every member of the ring with its state, vnodes, weight, records and share, and whether the
        ring has settled, as JSON-safe data (``GET /ring``); a server without a ring has none (404)."""
        from balancer.errors import UnknownMethodError

        raise UnknownMethodError("this server is not a ring member")


class Transport(ABC):
    """Carries RPCs between nodes and serves one node's handlers; an async context manager.

    One transport object belongs to one node; ``aclose`` stops serving and closes client connections.
    Failures to reach a peer raise :class:`~balancer.errors.PeerUnreachableError`; an error raised by
    the remote handler comes back as :class:`~balancer.errors.RemoteError` (or the same class, where
    the transport can tell).
    """

    @abstractmethod
    async def serve(
        self, host: str, port: int, handlers: Mapping[str, Handler], api: PublicApi | None = None
    ) -> int:
        """Serve ``handlers`` (and the public ``api``, where the transport has one); returns the port.

        ``handlers`` is read at each call, so entries added after ``serve`` returns are served too.
        """

    @abstractmethod
    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """Call ``method`` on the node at ``address`` and return its result within ``timeout`` seconds."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop serving and release every connection."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Storage(ABC):
    """An async store of :class:`~balancer.types.Record` s, keyed by key bytes; an async context manager.

    Writes are last-writer-wins: ``put`` keeps whichever version is greater. Deletes are tombstones
    (records whose value is ``None``), so a stale replica cannot resurrect a key.
    """

    @abstractmethod
    async def get(self, key: bytes) -> Record | None:
        """The record for ``key`` (possibly a tombstone), or ``None``."""

    @abstractmethod
    async def put(self, record: Record) -> bool:
        """Keep ``record`` unless a record with a greater or equal version is stored; True if kept."""

    @abstractmethod
    def scan(
        self, start: int | None = None, end: int | None = None, batch: int = 256
    ) -> AsyncIterator[list[Record]]:
        """Batches of at most ``batch`` records whose key id lies in the circular interval ``(start, end]``.

        Ids are ``hash_key(key, bits=config.bits)``. With ``start`` or ``end`` ``None``, every record.
        """

    @abstractmethod
    async def remove(self, records: list[Record]) -> int:
        """Physically drop these records unless a newer version was written since; returns how many."""

    @abstractmethod
    async def count(self) -> int:
        """How many records (tombstones included) are stored."""

    @abstractmethod
    async def close(self) -> None:
        """Flush and release the store."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class ReplicationStrategy(ABC):
    """Maps a key to the ring ids whose successors hold its replicas."""

    @abstractmethod
    def positions(self, key: bytes, replicas: int, space: KeySpace) -> list[int]:
        """Ring ids for ``key``'s replicas, most preferred first.

        If it returns fewer than ``replicas`` ids, the remaining replicas are the next distinct nodes in
        the successor list of the last id's owner.
        """


TransportFactory = Callable[["Config"], Transport]
StorageFactory = Callable[["Config"], Storage]
ReplicationFactory = Callable[["Config"], ReplicationStrategy]


# -- seams: register factories by name -----------------------------------------------------------


@hookspec
def balancer_register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    """Register transports, each under a name that ``Config.transport`` can select.

    Called once when the plugin manager's registry is built.

    :param register: call ``register(name, factory)``; ``factory(config)`` returns a new :class:`Transport`.
    """


@hookspec
def balancer_register_storages(register: Callable[[str, StorageFactory], None]) -> None:
    """Register storages, each under a name that ``Config.storage`` can select.

    :param register: call ``register(name, factory)``; ``factory(config)`` returns a new :class:`Storage`.
    """


@hookspec
def balancer_register_replications(register: Callable[[str, ReplicationFactory], None]) -> None:
    """Register replication strategies, each under a name that ``Config.replication`` can select.

    :param register: call ``register(name, factory)``; ``factory(config)`` returns a strategy.
    """


@hookspec
def balancer_repl_commands(cli: click.Group) -> None:
    """Add commands to the interactive REPL.

    Called once when a REPL starts. A command's callback finds the REPL session (``.node``, the running
    :class:`~balancer.node.Node`, and ``.say(text)`` to answer) in ``click.get_current_context().obj``.
    An ``async`` command is awaited by the REPL; decorate it with ``balancer.plugins.repl.pass_session``
    to receive the session as its first argument (click's context is gone by the time it runs).

    :param cli: the REPL's command group; add commands with ``cli.add_command`` or ``@cli.command``.
    """


# -- events: what a node observed on the ring -----------------------------------------------------


@hookspec
def balancer_node_joined(node: NodeInfo, peer: NodeInfo) -> None:
    """``node`` saw ``peer``'s process become a neighbour of one of its vnodes (a join, or the ring
    healing). Each of these events is reported once per process, not once per vnode.

    :param node: the observing node.
    :param peer: the new neighbour.
    """


@hookspec
def balancer_node_left(node: NodeInfo, peer: NodeInfo) -> None:
    """``peer`` told ``node`` that it is leaving the ring gracefully."""


@hookspec
def balancer_node_failed(node: NodeInfo, peer: NodeInfo) -> None:
    """``node`` stopped trusting ``peer`` after it failed to answer (it may come back)."""


@hookspec
def balancer_range_moved(node: NodeInfo, target: NodeInfo, records: int) -> None:
    """``node`` handed ``records`` records to ``target``, which now holds them (confirmed)."""


@hookspec
def balancer_membership_changed(node: NodeInfo, members: tuple[Member, ...]) -> None:
    """``node``'s view of the ring's processes changed: one joined, left, failed, came back, or changed
    state. ``members`` is the whole new view (every process, this one included), sorted by address.

    Called on the node's event loop; keep it cheap (the routing middleware rebuilds its table here).
    """


@hookspec
def balancer_kv_operation(node: NodeInfo, operation: str, seconds: float, ok: bool) -> None:
    """``node`` served a client's ``get``, ``put`` or ``delete`` in ``seconds``; ``ok`` is false when
    it raised (a missing key included). Called once per operation: keep it cheap.
    """


# -- serving --------------------------------------------------------------------------------------


@hookspec
def balancer_http_routes(node: Node, register: Callable[[Route], None]) -> None:
    """Add HTTP endpoints to a node (served by transports that speak HTTP, such as ``aiohttp``).

    Called once when the node starts, just before it serves: the handlers may use the node's whole API,
    but its address and ring state exist only once :meth:`~balancer.node.Node.start` has returned.

    :param node: the starting node.
    :param register: call ``register(Route("GET", "/metrics", handler))`` for each endpoint.
    """
