"""Shared fixtures: a plugin manager with only the built-in plugins, and rings on the local transport."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pluggy
import pytest

from balancer.config import Config
from balancer.node import Node
from balancer.plugin import plugin_manager
from balancer.plugins.local_transport import LocalNetwork, LocalTransport

# Maintenance loops never fire by themselves in local-ring tests: the tests drive every step.
QUIET = {"stabilize_interval": 3600.0, "fix_fingers_interval": 3600.0, "check_predecessor_interval": 3600.0}

RingFactory = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
def pm() -> pluggy.PluginManager:
    """A plugin manager with the built-in plugins only (entry points are not loaded under test)."""
    return plugin_manager(load_entrypoints=False)


@pytest.fixture
def network() -> LocalNetwork:
    """A fresh in-process network."""
    return LocalNetwork()


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


@pytest.fixture
async def make_ring(network: LocalNetwork, pm: pluggy.PluginManager) -> AsyncIterator[RingFactory]:
    """``await make_ring(n, seed=..., **config)``: n nodes joined one by one through random members,
    stabilized after each join, converged at the end. Every node is closed at teardown.
    """
    made: list[Node] = []

    async def build(count: int, *, seed: int = 1, **settings: object) -> list[Node]:
        config = Config(transport="local", load_entrypoints=False, **{**QUIET, **settings})  # type: ignore[arg-type]
        rng = random.Random(seed)
        nodes: list[Node] = []
        for _ in range(count):
            join = rng.choice(nodes).address if nodes else None
            node = Node(config, join=join, pm=pm, transport=LocalTransport(network))
            await node.start()
            made.append(node)
            nodes.append(node)
            for _ in range(2):
                for member in nodes:
                    await member.chord.stabilize()
        await converge(nodes)
        return nodes

    yield build
    for node in made:
        await node.close()
