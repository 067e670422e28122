"""Helpers for rings on the in-process network (convergence checks, driving maintenance by hand), and for
aiohttp application servers on 127.0.0.1 that record what they serve."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from balancer.config import Config
from balancer.middleware import HOPS_HEADER, RingRouter, setup_routing
from balancer.node import Node
from balancer.survey import exact
from balancer.types import NodeInfo

# Maintenance loops never fire by themselves in local-ring tests: the tests drive every step.
QUIET = {"stabilize_interval": 3600.0, "fix_fingers_interval": 3600.0, "check_predecessor_interval": 3600.0}

# A ring of one node can only acknowledge writes on one replica.
SOLO: dict[str, Any] = {"replicas": 1, "write_quorum": 1, "read_quorum": 1}

RingFactory = Callable[..., Awaitable[list[Node]]]


def addresses(nodes: Iterable[NodeInfo]) -> set[str]:
    """The processes ``nodes`` (vnodes) belong to."""
    return {n.address for n in nodes}


def ring_is_correct(nodes: list[Node]) -> bool:
    """Every vnode's predecessor is its true neighbour and its successor list is exactly the next ids of
    distinct processes (cut where the walk comes back to it), as the sorted ids of all nodes imply."""
    return exact(v for node in nodes for v in node.ring.vnodes)


async def converge(nodes: list[Node], rounds: int = 60) -> int:
    """Run check_predecessor + stabilize on every node until the ring is correct; returns rounds taken.

    Then refresh every finger table. Raises AssertionError if ``rounds`` do not suffice.
    """
    for done in range(rounds):
        if ring_is_correct(nodes):
            for node in nodes:
                await node.ring.fix_all()
            return done
        for node in nodes:
            await node.ring.check_predecessor()
            await node.ring.stabilize()
    raise AssertionError(f"the ring did not converge in {rounds} rounds")


async def settle(nodes: list[Node], passes: int = 2) -> None:
    """Let background replication finish, then run maintenance passes on every node."""
    for _ in range(passes):
        for node in nodes:
            await node.kv.drain()
        for node in nodes:
            await node.kv.maintain()


async def copies(nodes: list[Node]) -> dict[bytes, int]:
    """How many live nodes hold each key."""
    counts: dict[bytes, int] = {}
    for node in nodes:
        for record in await node.local_records():
            counts[record.key] = counts.get(record.key, 0) + 1
    return counts


STRANGER_PAGE = (
    "<!DOCTYPE html>\n<html>\n<head><title>404 Not Found</title></head>\n<body>nope</body>\n</html>\n"
)
"""What :func:`stranger` answers to anything."""


@contextlib.asynccontextmanager
async def stranger() -> AsyncIterator[str]:
    """The address of an HTTP server on 127.0.0.1 that is not a balancer node: an HTML 404 for anything."""

    async def anything(request: web.Request) -> web.Response:
        return web.Response(status=404, text=STRANGER_PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:  # closed after the server that listens on it
        sock.bind(("127.0.0.1", 0))
        try:
            await web.SockSite(runner, sock).start()
            yield f"127.0.0.1:{sock.getsockname()[1]}"
        finally:
            await runner.cleanup()


# -- application servers ------------------------------------------------------------------------

Setup = Callable[[web.Application, str], None]
"""Installs routing on an application, given the application's own address."""


def bound_socket() -> socket.socket:
    """A socket bound to a free port on 127.0.0.1 (not listening yet)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class Backend:
    """One application server: records what it served and how many requests it held at once."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.served: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.gate: asyncio.Event | None = None

    def app(self, setup: Setup | None) -> web.Application:
        app = web.Application()
        if setup is not None:
            setup(app, self.address)
        app.router.add_get("/items/{key}", self.item)
        app.router.add_post("/echo/{key}", self.echo)
        app.router.add_get("/plain", self.plain)
        return app

    async def item(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.served.append(key)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return web.json_response(
                {"served_by": self.address, "key": key, "hops": request.headers.get(HOPS_HEADER, "0")}
            )
        finally:
            self.in_flight -= 1

    async def echo(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Backend": self.address})
        await response.prepare(request)
        async for chunk in request.content.iter_chunked(1 << 15):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def plain(self, request: web.Request) -> web.Response:
        return web.Response(text=f"plain from {self.address}")


@contextlib.asynccontextmanager
async def servers(count: int, setup: Callable[[list[str]], Setup | None]) -> AsyncIterator[list[Backend]]:
    """``count`` backends on pre-bound loopback sockets; ``setup(addresses)`` installs routing on each."""
    sockets = [bound_socket() for _ in range(count)]
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    backends = [Backend(a) for a in addresses]
    runners = []
    try:
        for backend, sock in zip(backends, sockets, strict=True):
            runner = web.AppRunner(backend.app(setup(addresses)))
            await runner.setup()
            await web.SockSite(runner, sock).start()
            runners.append(runner)
        yield backends
    finally:
        for runner in runners:
            await runner.cleanup()
        for sock in sockets:
            sock.close()


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    """GET ``url``: the status and the JSON body."""
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` on the event loop until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.01)


# -- rings of real nodes beside application servers -------------------------------------------------

HTTP_RING: dict[str, Any] = {
    "load_entrypoints": False,
    "stabilize_interval": 0.05,
    "fix_fingers_interval": 0.05,
    "check_predecessor_interval": 0.05,
    "cluster_secret": "the ring's own secret",  # also proves the routers' forwards to each other
    "seed": 7,
    **SOLO,
}
"""Settings of :func:`http_ring`'s nodes: fast maintenance, one replica, a cluster secret."""


@contextlib.asynccontextmanager
async def http_ring(count: int, **settings: Any) -> AsyncIterator[list[Node]]:
    """``count`` nodes on the aiohttp transport on 127.0.0.1, each joined through the first; yields once
    the ring is correct and every node's membership view lists them all. Every node is closed at the end.
    """
    config = Config(**{**HTTP_RING, **settings})
    nodes: list[Node] = []
    try:
        for _ in range(count):
            node = Node(config, join=nodes[0].address if nodes else None)
            nodes.append(await node.start())
        everyone = sorted(n.address for n in nodes)
        await until(
            lambda: (
                ring_is_correct(nodes) and all([m.address for m in n.members()] == everyone for n in nodes)
            ),
            "the ring converging",
        )
        yield nodes
    finally:
        for node in nodes:
            await node.close()


class RingApps:
    """``servers``' setup for applications beside a ring's nodes: application ``i`` runs beside ``nodes[i]``.

    With ``routing``, each application gets a router on its node (``options`` go to ``setup_routing``),
    kept in :attr:`routers` by application address. :meth:`url` maps a node's ring address to its
    application's base URL.
    """

    def __init__(self, nodes: list[Node], *, routing: bool = True, **options: Any) -> None:
        self.nodes = nodes
        self.routing = routing
        self.options = options
        self.app_of: dict[str, str] = {}
        """Application address by ring address."""
        self.routers: dict[str, RingRouter] = {}

    def url(self, address: str) -> str:
        """The base URL of the application beside the node at ring ``address``."""
        return f"http://{self.app_of[address]}"

    def __call__(self, addresses: list[str]) -> Setup | None:
        self.app_of.update({n.address: a for n, a in zip(self.nodes, addresses, strict=True)})
        if not self.routing:
            return None

        def setup(app: web.Application, me: str) -> None:
            node = self.nodes[addresses.index(me)]
            self.routers[me] = setup_routing(app, node=node, backend_url=self.url, **self.options)

        return setup
