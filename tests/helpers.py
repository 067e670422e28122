"""Helpers for rings on the in-process network: convergence checks and driving maintenance by hand."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from balancer.node import Node

# Maintenance loops never fire by themselves in local-ring tests: the tests drive every step.
QUIET = {"stabilize_interval": 3600.0, "fix_fingers_interval": 3600.0, "check_predecessor_interval": 3600.0}

# A ring of one node can only acknowledge writes on one replica.
SOLO: dict[str, Any] = {"replicas": 1, "write_quorum": 1, "read_quorum": 1}

RingFactory = Callable[..., Awaitable[list[Node]]]


def ring_is_correct(nodes: list[Node]) -> bool:
    """Every node's successor and predecessor are its true neighbours; successor lists ordered, distinct."""
    ring = sorted(nodes, key=lambda n: n.info.id)
    count = len(ring)
    for i, node in enumerate(ring):
        expected = [ring[(i + k) % count].info for k in range(1, min(node.config.successors, count - 1) + 1)]
        if count == 1:
            expected = [node.info]
        if node.chord.successors != expected:
            return False
        if count > 1 and node.chord.predecessor != ring[i - 1].info:
            return False
    return True


async def converge(nodes: list[Node], rounds: int = 60) -> int:
    """Run check_predecessor + stabilize on every node until the ring is correct; returns rounds taken.

    Then refresh every finger table. Raises AssertionError if ``rounds`` do not suffice.
    """
    for done in range(rounds):
        if ring_is_correct(nodes):
            for node in nodes:
                await node.chord.fix_fingers()
            return done
        for node in nodes:
            await node.chord.check_predecessor()
            await node.chord.stabilize()
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
