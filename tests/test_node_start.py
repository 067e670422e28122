"""How a node joins at start: seeds that are not up yet are waited for, strangers are skipped, refusals
and a seed that is the node itself are final. In-process nodes (local transport, and aiohttp on real
loopback sockets where the wire matters)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pluggy
import pytest
from helpers import QUIET, SOLO, converge

from balancer.config import Config
from balancer.errors import (
    ConfigError,
    IncompatibleConfigError,
    PeerUnreachableError,
    RingError,
    UnauthorizedError,
)
from balancer.node import Node
from balancer.plugins.local_transport import LocalNetwork, LocalTransport

Waits = list[tuple[list[str], int, int]]


def local(port: int, **settings: object) -> Config:
    """Settings of an in-process node on ``port`` of a local network, with quiet background loops."""
    return Config(transport="local", load_entrypoints=False, port=port).evolve(**QUIET, **SOLO, **settings)


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` on the event loop until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.01)


def recorder(waits: Waits) -> Callable[[list[str], int, int], None]:
    """An ``on_join_wait`` callback that records its calls."""
    return lambda seeds, attempt, attempts: waits.append((seeds, attempt, attempts))


async def test_a_joiner_waits_for_a_seed_that_starts_later(
    network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    waits: Waits = []
    joiner = Node(local(2), join="127.0.0.1:1", pm=pm, transport=LocalTransport(network))
    starting = asyncio.create_task(joiner.start(on_join_wait=recorder(waits)))
    await until(lambda: len(waits) >= 2, "two waiting passes")
    seed = Node(local(1), pm=pm, transport=LocalTransport(network))
    try:
        await seed.start()
        await starting
        assert joiner.bootstrap == seed.address
        await converge([seed, joiner])
        seeds, attempt, attempts = waits[0]
        assert (seeds, attempt) == (["127.0.0.1:1"], 1)
        assert attempts > 10  # backoff from 0.25 s to 2 s over the default 30 s
        assert [w[1] for w in waits] == list(range(1, len(waits) + 1))
    finally:
        await joiner.close()
        await seed.close()


async def test_a_joiner_gives_up_after_the_join_timeout(
    network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    waits: Waits = []
    joiner = Node(local(2, join_timeout=1.0), join="127.0.0.1:1", pm=pm, transport=LocalTransport(network))
    with pytest.raises(PeerUnreachableError, match=r"^127\.0\.0\.1:1: no such node \(after 3 attempts"):
        await joiner.start(on_join_wait=recorder(waits))
    assert waits == [(["127.0.0.1:1"], 1, 3), (["127.0.0.1:1"], 2, 3)]  # passes at 0, 0.25 and 0.75 s
    assert joiner.stopped


async def test_a_node_that_may_create_the_ring_makes_one_pass(
    network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    waits: Waits = []
    node = Node(
        local(2),
        join=["127.0.0.1:1", "127.0.0.1:3"],
        create_if_alone=True,
        pm=pm,
        transport=LocalTransport(network),
    )
    try:
        await node.start(on_join_wait=recorder(waits))
        assert node.bootstrap is None
        assert waits == []
    finally:
        await node.close()


async def test_a_seed_that_has_not_joined_yet_refuses_joiners(
    network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    """A chain: c joins b, which waits for a, which starts last. b must not pass itself off as a ring
    of one to c, or c and b would found a ring of their own."""
    a_waits: Waits = []
    b = Node(local(2), join="127.0.0.1:1", pm=pm, transport=LocalTransport(network))
    c = Node(local(3), join="127.0.0.1:2", pm=pm, transport=LocalTransport(network))
    a = Node(local(1), pm=pm, transport=LocalTransport(network))
    b_starting = asyncio.create_task(b.start(on_join_wait=recorder(a_waits)))
    c_waits: Waits = []
    c_starting = asyncio.create_task(c.start(on_join_wait=recorder(c_waits)))
    try:
        await until(lambda: len(c_waits) >= 2 and len(a_waits) >= 2, "both joiners waiting")
        assert not c_starting.done()  # b said "not a ring member yet", so c waits instead of joining
        await a.start()
        await asyncio.gather(b_starting, c_starting)
        assert (b.bootstrap, c.bootstrap) == (a.address, b.address)
        await converge([a, b, c])
    finally:
        for node in (a, b, c):
            await node.close()


async def test_a_seed_equal_to_the_own_address_is_a_config_error(
    network: LocalNetwork, pm: pluggy.PluginManager
) -> None:
    node = Node(local(7), join="127.0.0.1:7", pm=pm, transport=LocalTransport(network))
    with pytest.raises(ConfigError, match=r"seed 127\.0\.0\.1:7 is this node's own address"):
        await node.start()
    assert node.stopped


@pytest.mark.parametrize(
    ("change", "error"),
    [({"replicas": 2}, IncompatibleConfigError), ({"cluster_secret": "guess"}, UnauthorizedError)],
)
async def test_a_refusal_is_final_not_waited_for(
    change: dict[str, object], error: type[Exception], pm: pluggy.PluginManager
) -> None:
    settings = Config(load_entrypoints=False, cluster_secret="right").evolve(**QUIET)
    if "replicas" in change:
        settings = settings.evolve(cluster_secret=None)
    waits: Waits = []
    async with Node(settings, pm=pm) as seed:
        joiner = Node(settings.evolve(**change), join=seed.address, pm=pm)
        with pytest.raises(error):
            await joiner.start(on_join_wait=recorder(waits))
    assert waits == []


async def test_a_joiner_whose_clock_is_behind_a_fresh_seed_asks_again(pm: pluggy.PluginManager) -> None:
    from balancer.plugins.aiohttp_transport import _RPC_AUTH, AiohttpTransport

    settings = Config(load_entrypoints=False, cluster_secret="right").evolve(**QUIET, **SOLO)
    waits: Waits = []
    async with Node(settings, pm=pm) as seed:
        assert isinstance(seed.transport, AiohttpTransport)
        runner = seed.transport._runner
        assert runner is not None
        guard = runner.app[_RPC_AUTH].guard
        assert guard is not None
        guard.started = time.time() + 0.6  # as if the joiner's clock were 0.6 s behind the seed's
        joiner = Node(settings, join=seed.address, pm=pm)
        try:
            await joiner.start(on_join_wait=recorder(waits))
            assert joiner.bootstrap == seed.address
        finally:
            await joiner.leave()
    assert waits  # refused as stale at first, then let in once its signatures were newer than the start


async def test_a_seed_that_is_not_a_balancer_node_is_skipped(
    stranger_address: str, pm: pluggy.PluginManager
) -> None:
    stranger = stranger_address
    settings = Config(load_entrypoints=False).evolve(**QUIET)
    waits: Waits = []
    async with Node(settings, pm=pm) as seed:
        async with Node(settings, join=[stranger, seed.address], pm=pm) as joiner:
            assert joiner.bootstrap == seed.address
        alone = Node(settings, join=stranger, pm=pm)
        with pytest.raises(RingError) as caught:
            await alone.start(on_join_wait=recorder(waits))
    message = str(caught.value)
    assert message.startswith(f"cannot join through {stranger}: HTTP 404 answer is not JSON")
    assert "is it a balancer node?" in message
    assert "<" not in message  # the page itself is not repeated
    assert "\n" not in message
    assert waits == []  # it answered: nothing to wait for
