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
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

import pluggy

from balancer.keyspace import KeySpace
from balancer.types import Handler, Member, NodeInfo, Payload, Record, RingView

if TYPE_CHECKING:
    import asyncio

    import click

    from balancer.config import Config
    from balancer.node import Node

__all__ = [
    "Handler",
    "Payload",
    "Placement",
    "PublicApi",
    "ReplicationStrategy",
    "RingMember",
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


@dataclass(frozen=True, slots=True)
class Route:
    """An extra HTTP endpoint a plugin serves on every node (``GET /metrics``, say).

    ``handler()`` returns ``(status, content type, body)``; transports without HTTP ignore routes. With an
    API token set, the endpoint needs it as ``/status`` does (Prometheus sends one with ``authorization``),
    unless it is ``public``: a page that holds no data itself (the ``/ui`` page, whose requests for data
    carry the token).
    """

    method: str
    path: str
    handler: Callable[[], Awaitable[tuple[int, str, bytes]]]
    public: bool = False


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

    async def lookup_view(self, key: str) -> Payload:
        """Where ``key`` lives: its ring id, its owner, the lookup's hops and the processes that answered
        them, its replicas and stand-ins, as JSON-safe data (``GET /lookup/<key>``); 404 without a ring."""
        from balancer.errors import UnknownMethodError

        raise UnknownMethodError("this server is not a ring member")


@runtime_checkable
class RingMember(Protocol):
    """A running ring member as plugins that drive one see it (the REPL, say); a
    :class:`~balancer.node.Node` is one. Keys are text or bytes; values are bytes."""

    @property
    def address(self) -> str:
        """The ``host:port`` this member serves on."""

    @property
    def space(self) -> KeySpace:
        """The ring's identifier space."""

    @property
    def stopped(self) -> bool:
        """Whether the member has left the ring or closed."""

    @property
    def member(self) -> bool:
        """Whether this is a ring member (a :class:`~balancer.client.RemoteNode` client is not)."""

    async def get(self, key: str | bytes) -> bytes:
        """The value of ``key``; raises :class:`~balancer.errors.KeyNotFoundError`."""

    async def put(self, key: str | bytes, value: bytes) -> None:
        """Store ``value`` under ``key`` on the ring (acknowledged by the write quorum)."""

    async def delete(self, key: str | bytes) -> None:
        """Delete ``key``; raises :class:`~balancer.errors.KeyNotFoundError` if it has no live value."""

    async def status(self) -> Payload:
        """This member's view (``GET /status``), as JSON-safe data."""

    async def ring_view(self) -> Payload:
        """Every member of the ring (``GET /ring``), as JSON-safe data."""

    async def local_records(self) -> list[Record]:
        """The records this process stores itself (tombstones included)."""

    def view(self) -> RingView:
        """The routing state of this member's first vnode: predecessor, successors, fingers."""

    def members(self) -> tuple[Member, ...]:
        """Every process of the ring as this member knows it."""

    async def leave(self) -> None:
        """Hand this member's keys off and leave the ring gracefully."""


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


class Placement(ABC):
    """What a replication strategy sees of the ring while it places keys: lookups and the members.

    One object serves a whole batch of placements (a maintenance pass, or one client operation), and
    caches lookup answers, so asking for the same ids again costs nothing.
    """

    space: KeySpace
    """The ring's identifier space: ``space.id(key, salt=i)`` hashes a key onto the ring."""

    @abstractmethod
    async def successors(self, ident: int) -> tuple[NodeInfo, ...]:
        """The vnode that owns ``ident`` and the vnodes after it, as its successor list has them (live
        vnodes only, several of one process possible). Raises a :class:`~balancer.errors.RingError` if
        the lookup fails."""

    @abstractmethod
    def members(self) -> tuple[Member, ...]:
        """Every process of the ring as this node knows it (itself included, sorted by address), with
        its vnode ids and state; see :meth:`balancer.node.Node.members`."""


class ReplicationStrategy:
    """Chooses the processes that hold a key's replicas, and the ones that stand in when they fail.

    A simple strategy overrides :meth:`positions` (ring ids; their owners hold the replicas); one that
    must see the ring (groups of processes, racks, every other successor) overrides :meth:`place`.
    Strategies are ring settings: a node whose strategy name or :meth:`settings` differ from the ring's
    is refused at join.
    """

    def positions(self, key: bytes, replicas: int, space: KeySpace) -> list[int]:
        """Ring ids for ``key``'s replicas, most preferred first (the key's own id by default).

        If it returns fewer than ``replicas`` ids, the remaining replicas are the next distinct processes
        in the successor list of the last id's owner.
        """
        return [space.id(key)]

    async def place(self, key: bytes, replicas: int, ring: Placement) -> list[NodeInfo]:
        """``key``'s replicas then its stand-ins, most preferred first (vnodes; a process counts once, at
        its first appearance).

        The first ``replicas`` distinct processes are the replica set: writes wait for W of them and
        reads ask R of them. The ones after stand in for replicas that fail (they keep a copy but never
        count towards a quorum), and a read that finds the ring changing asks them too. Return the same
        answer for the same ring on every node, or quorums will not overlap.

        The default puts replica ``i`` on the owner of ``positions()[i]`` (the next process of that
        owner's successor list if the owner is taken), fills up from the last owner's successor list,
        and lists the rest of that list as stand-ins.
        """
        chosen: list[NodeInfo] = []
        taken: set[str] = set()
        after: tuple[NodeInfo, ...] = ()
        for position in self.positions(key, replicas, ring.space):
            after = await ring.successors(position)
            node = next((n for n in after if n.address not in taken), None)
            if node is not None:
                chosen.append(node)
                taken.add(node.address)
        return chosen + [n for n in after if n.address not in taken]

    def settings(self) -> dict[str, int | str]:
        """This strategy's parameters that every member of a ring must share (none by default)."""
        return {}


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


@hookspec(firstresult=True)
def balancer_repl(node: RingMember, pm: pluggy.PluginManager, stop: asyncio.Event) -> Awaitable[None] | None:
    """Return the interactive session to run on ``node`` (``balancer repl``, ``node --cli``), or ``None``
    to leave it to another plugin; the first answer wins, and the built-in click REPL answers last.

    The session (a coroutine, not started yet) reads commands until the user ends it or ``stop`` is set,
    and leaves the ring at the end unless a command already did. It gathers its commands with
    ``pm.hook.balancer_repl_commands``.

    :param node: the running member the session works on.
    :param pm: the plugin manager the node runs with.
    :param stop: set when the process is asked to stop (SIGINT, SIGTERM).
    """


@hookspec
def balancer_repl_commands(cli: click.Group) -> None:
    """Add commands to the interactive REPL.

    Called once when a REPL starts. A command's callback finds the REPL session (``.node``, the running
    :class:`~balancer.node.Node`, and ``.say(text)`` to answer) in ``click.get_current_context().obj``.
    An ``async`` command is awaited by the REPL; decorate it with ``balancer.repl.pass_session``
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
def balancer_kv_operation(
    node: NodeInfo, operation: str, seconds: float, ok: bool, outcome: str, key_id: int
) -> None:
    """``node`` coordinated a client's ``get``, ``put`` or ``delete``, which took ``seconds``.

    Called once per operation, on the node's event loop: keep it cheap. A hookimpl may take any subset
    of the arguments.

    :param node: the node that served the operation (its coordinator: it asked the replicas).
    :param operation: ``"get"``, ``"put"`` or ``"delete"``.
    :param seconds: how long the operation took.
    :param ok: whether it succeeded (``outcome == "ok"``).
    :param outcome: ``"ok"``; ``"not_found"`` (no live value); ``"quorum"`` (fewer replicas answered
        than the quorum); ``"refused"`` (this node refused: it sees no majority of the ring, or is
        leaving); ``"invalid"`` (a malformed or oversize key or value); ``"error"`` (anything else).
    :param key_id: the key's id on the ring (a hash of the key), never the key itself, so plugins can
        count hot keys without seeing what is stored.
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
