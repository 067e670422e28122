"""The balanced client channel: calls go where bounded-load hashing puts their key, calls in flight are
the load (released on completion, error and cancellation), and an unavailable backend's calls move on to
the key's next candidate."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import balancer_grpc
import grpc
import pytest
from balancer_grpc import BalancedChannel, RoutingInterceptor
from grpc_support import SERVICE, App, dumps, loads, start_app
from processes import free_port

from balancer.bounded import BoundedLoadBalancer
from balancer.config import Config
from balancer.errors import ConfigError, NoNodesError
from balancer.node import Node
from balancer.plugin import plugin_manager

KEYS = [f"user:{i}" for i in range(30)]


@pytest.fixture
async def apps() -> AsyncIterator[list[App]]:
    started = [await start_app() for _ in range(3)]
    try:
        yield started
    finally:
        for app in started:
            await app.server.stop(None)


async def test_calls_go_to_the_backend_their_key_hashes_to(apps: list[App]) -> None:
    names = [a.address for a in apps]
    reference = BoundedLoadBalancer(names, load_factor=math.inf)
    async with BalancedChannel(names, load_factor=math.inf) as channel:
        who = channel.unary_unary(f"/{SERVICE}/Who", dumps, loads)
        for key in KEYS:
            answer = await who({"key": key}, key=key, timeout=10)
            assert answer["served_by"] == reference.peek(key)
        assert {reference.peek(k) for k in KEYS} == set(names)  # every backend had its share
        count = channel.unary_stream(f"/{SERVICE}/Count", dumps, loads)
        answers = [a async for a in count({"n": 3}, key=KEYS[0], timeout=10)]
        assert [a["served_by"] for a in answers] == [reference.peek(KEYS[0])] * 3
        assert channel.balancer.total_load == 0


async def test_a_hot_key_spreads_when_its_backend_is_full(apps: list[App]) -> None:
    names = [a.address for a in apps]
    async with BalancedChannel(names, load_factor=1.25) as channel:
        slow = channel.unary_unary(f"/{SERVICE}/Slow", dumps, loads)
        calls = [asyncio.ensure_future(slow({}, key="hot", timeout=30)) for _ in range(6)]
        for app in apps:
            app.echo.release.clear()

        async def all_in() -> int:
            return sum(app.echo.served.count("Slow") for app in apps)

        deadline = asyncio.get_running_loop().time() + 20
        while await all_in() < 6:
            assert asyncio.get_running_loop().time() < deadline, "the calls did not all arrive"
            await asyncio.sleep(0.02)
        loads_now = channel.balancer.loads()
        assert sum(loads_now.values()) == 6
        assert max(loads_now.values()) <= math.ceil(1.25 * 6 / 3)  # no backend over its capacity
        assert sum(1 for n in loads_now.values() if n) >= 2
        for app in apps:
            app.echo.release.set()
        served = [answer["served_by"] for answer in await asyncio.gather(*calls)]
        assert len(set(served)) >= 2
        assert channel.balancer.total_load == 0


async def test_the_load_is_released_on_completion_error_and_cancellation(apps: list[App]) -> None:
    names = [a.address for a in apps]
    async with BalancedChannel(names) as channel:
        balancer = channel.balancer
        fail = channel.unary_unary(f"/{SERVICE}/Fail", dumps, loads)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await fail({}, key="k", timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND  # not retried: not UNAVAILABLE
        assert sum(app.echo.served.count("Fail") for app in apps) == 1
        assert balancer.total_load == 0

        owner = next(a for a in apps if a.address == balancer.peek("k"))
        owner.echo.entered.clear()
        owner.echo.release.clear()
        slow = channel.unary_unary(f"/{SERVICE}/Slow", dumps, loads)
        task = asyncio.ensure_future(slow({}, key="k", timeout=30))
        await asyncio.wait_for(owner.echo.entered.wait(), 20)
        assert balancer.loads()[owner.address] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert balancer.total_load == 0

        count = channel.unary_stream(f"/{SERVICE}/Count", dumps, loads)
        stream = count({"n": 100}, key="k", timeout=30)
        first = await anext(stream)
        assert first["i"] == 0
        assert balancer.loads()[owner.address] == 1  # held while the caller reads
        await stream.aclose()  # the caller stops reading: the call is cancelled, the load released
        assert balancer.total_load == 0


async def test_an_unavailable_backend_is_skipped_for_the_keys_next_candidate(apps: list[App]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    names = [dead, *(a.address for a in apps)]
    reference = BoundedLoadBalancer(names, load_factor=math.inf)
    orphans = [k for k in KEYS if reference.peek(k) == dead]
    assert orphans
    async with BalancedChannel(names, load_factor=math.inf) as channel:
        who = channel.unary_unary(f"/{SERVICE}/Who", dumps, loads)
        for key in orphans:
            answer = await who({"key": key}, key=key, timeout=10)
            candidates = list(reference.candidates(key))
            assert candidates[0] == dead
            assert answer["served_by"] == candidates[1]
        assert channel.balancer.total_load == 0

    # no retries left: the last backend's own status comes back
    async with BalancedChannel([dead], retries=0) as alone:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await alone.unary_unary(f"/{SERVICE}/Who", dumps, loads)({}, key="k", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert alone.balancer.total_load == 0
    # every backend tried and none left
    async with BalancedChannel([dead], retries=3) as alone:
        with pytest.raises(grpc.aio.AioRpcError):
            await alone.unary_unary(f"/{SERVICE}/Who", dumps, loads)({}, key="k", timeout=10)
    async with BalancedChannel([]) as empty:
        with pytest.raises(NoNodesError):
            await empty.unary_unary(f"/{SERVICE}/Who", dumps, loads)({}, key="k", timeout=10)


async def test_behind_the_interceptor_the_key_travels_as_metadata(apps: list[App]) -> None:
    names = [a.address for a in apps]
    reference = BoundedLoadBalancer(names, load_factor=math.inf)
    # a front server that owns nothing: it forwards each call by the key the channel sent as metadata
    router = RoutingInterceptor(balancer=BoundedLoadBalancer(names, load_factor=math.inf))
    front = await start_app([router])
    try:
        async with BalancedChannel([front.address]) as channel:
            who = channel.unary_unary(f"/{SERVICE}/Who", dumps, loads)
            for key in KEYS[:6]:
                answer = await who({}, key=key, timeout=10)
                assert answer["served_by"] == reference.peek(key)
                assert answer["hops"] == "1"
    finally:
        await front.server.stop(None)
        await router.aclose()


async def test_over_a_rings_members() -> None:
    pm = plugin_manager(load_entrypoints=False, plugins=[balancer_grpc])
    config = Config(transport="grpc", load_entrypoints=False, stabilize_interval=0.1, rpc_timeout=2.0)
    nodes: list[Node] = []
    started: list[App] = []
    try:
        for _ in range(2):
            nodes.append(await Node(config, pm=pm, join=nodes[0].address if nodes else None).start())
        started = [await start_app() for _ in nodes]
        service = {n.address: a.address for n, a in zip(nodes, started, strict=True)}
        async with BalancedChannel(node=nodes[0], target=service.__getitem__) as channel:
            who = channel.unary_unary(f"/{SERVICE}/Who", dumps, loads)
            served = {(await who({}, key=k, timeout=10))["served_by"] for k in KEYS}
            assert served <= set(service.values())
            assert channel.members is not None
            assert channel.members.started
        for node in reversed(nodes):
            await node.leave()
    finally:
        for app in started:
            await app.server.stop(None)
        for node in nodes:
            await node.close()


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        BalancedChannel()
    with pytest.raises(ConfigError, match="retries"):
        BalancedChannel(["a:1"], retries=-1)


async def test_with_the_servers_secret_the_chosen_backend_serves_the_call(apps: list[App]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    names = [dead, apps[0].address]
    reference = BoundedLoadBalancer(names, load_factor=math.inf)
    key = next(k for k in KEYS if reference.peek(k) == dead)
    # a server whose own balancer still names the dead one as the key's owner
    router = RoutingInterceptor(
        balancer=BoundedLoadBalancer(names, load_factor=math.inf), local="front", secret="shared"
    )
    front = await start_app([router])
    try:
        target = {dead: dead, "front": front.address}
        async with BalancedChannel([dead, "front"], target=target.__getitem__, retries=1) as strangers:
            with pytest.raises(grpc.aio.AioRpcError) as routed_again:  # no proof: front routes it to dead
                await strangers.unary_unary(f"/{SERVICE}/Who", dumps, loads)({}, key=key, timeout=10)
            assert routed_again.value.code() == grpc.StatusCode.UNAVAILABLE
        async with BalancedChannel(
            [dead, "front"], target=target.__getitem__, retries=1, secret="shared"
        ) as trusted:
            answer = await trusted.unary_unary(f"/{SERVICE}/Who", dumps, loads)({}, key=key, timeout=10)
            assert answer["served_by"] == front.address
            assert answer["hops"] == "1"
    finally:
        await front.server.stop(None)
        await router.aclose()
