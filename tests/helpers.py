"""Helpers for rings on the in-process network: convergence checks and driving maintenance by hand."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

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
