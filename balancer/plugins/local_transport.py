"""The ``local`` transport: nodes in one process call each other through an in-memory network.

For tests and simulations of thousands of nodes in one event loop. The network can take a node down or
cut a single link, so failures are simulated deterministically; every payload makes a JSON round trip
(unless ``wire=False``), so what passes here also passes over the aiohttp transport.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable, Mapping

import orjson

from balancer.config import Config
from balancer.errors import BalancerError, PeerUnreachableError, RemoteError, UnknownMethodError
from balancer.hookspecs import Handler, Payload, PublicApi, Transport, TransportFactory, hookimpl

__all__ = ["LocalNetwork", "LocalTransport", "default_network"]


class LocalNetwork:
    """The switchboard: which addresses serve which handlers, which are down, which links are cut."""

    def __init__(self, *, wire: bool = True) -> None:
        self.wire = wire
        self.servers: dict[str, Mapping[str, Handler]] = {}
        self.down: set[str] = set()
        self.cut: set[frozenset[str]] = set()
        self.calls: Counter[str] = Counter()
        """RPCs delivered, by method."""
        self.bytes: Counter[str] = Counter()
        """Bytes of JSON carried (request and answer), by method; counted when ``wire`` is on."""
        self.failures = 0
        """Calls that failed because the peer was down, gone or cut off (each costs one timeout)."""
        self._ports = itertools.count(1)

    def allocate(self, host: str, port: int) -> int:
        """A port not yet used on this network (``port`` itself when it is free and non-zero)."""
        while port == 0 or f"{host}:{port}" in self.servers:
            port = next(self._ports)
        return port

    def kill(self, address: str) -> None:
        """Make ``address`` unreachable, as if the process died; its handlers are dropped."""
        self.servers.pop(address, None)
        self.down.add(address)

    def cut_link(self, a: str, b: str) -> None:
        """Calls between ``a`` and ``b`` fail in both directions until :meth:`heal_link`."""
        self.cut.add(frozenset((a, b)))

    def heal_link(self, a: str, b: str) -> None:
        """Undo :meth:`cut_link`."""
        self.cut.discard(frozenset((a, b)))

    async def deliver(self, source: str, address: str, method: str, payload: Payload) -> Payload:
        """Run ``method`` at ``address`` as if it came over the wire from ``source``."""
        handlers = self.servers.get(address)
        if handlers is None or frozenset((source, address)) in self.cut:
            self.failures += 1
            if handlers is None:  # nothing listens there: as certain as a refused connection
                raise PeerUnreachableError(
                    address, "down" if address in self.down else "no such node", refused=True
                )
            raise PeerUnreachableError(address, "the link is cut")
        handler = handlers.get(method)
        if handler is None:
            raise UnknownMethodError(f"unknown method {method!r}")
        self.calls[method] += 1
        if self.wire:
            raw = orjson.dumps(payload)
            self.bytes[method] += len(raw)
            payload = orjson.loads(raw)
        try:
            result = await handler(payload)
        except BalancerError:
            raise
        except Exception as exc:
            raise RemoteError(type(exc).__name__, str(exc)) from exc
        if address not in self.servers:  # the node died while handling the call
            self.failures += 1
            raise PeerUnreachableError(address, "died during the call", refused=True)
        if not self.wire:
            return result
        raw = orjson.dumps(result)
        self.bytes[method] += len(raw)
        answer: Payload = orjson.loads(raw)
        return answer


_default = LocalNetwork()


def default_network() -> LocalNetwork:
    """The network that transports made by the plugin (``Config(transport="local")``) share."""
    return _default


class LocalTransport(Transport):
    """One node's attachment to a :class:`LocalNetwork`."""

    def __init__(self, network: LocalNetwork | None = None) -> None:
        self.network = network or default_network()
        self.address = ""

    async def serve(
        self, host: str, port: int, handlers: Mapping[str, Handler], api: PublicApi | None = None
    ) -> int:
        port = self.network.allocate(host, port)
        self.address = f"{host}:{port}"
        self.network.down.discard(self.address)
        self.network.servers[self.address] = handlers
        return port

    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """Deliver the call in-process; a handler slower than ``timeout`` fails it, as on a network."""
        if self.address and self.address not in self.network.servers:
            raise PeerUnreachableError(address, "this node is down")
        try:
            async with asyncio.timeout(timeout):
                return await self.network.deliver(self.address, address, method, payload)
        except TimeoutError:
            raise PeerUnreachableError(address, "timed out") from None

    async def aclose(self) -> None:
        if self.network.servers.get(self.address) is not None:
            del self.network.servers[self.address]


@hookimpl(trylast=True)
def balancer_register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    """Register ``local``."""

    def make(config: Config) -> Transport:
        return LocalTransport()

    register("local", make)
