"""The routing interceptor: calls served by their key's owner whichever server receives them, the loop
guard, forward proofs, and the middleware's error mapping as gRPC statuses."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import balancer_grpc
import grpc
import pytest
from balancer_grpc import KEY_METADATA, RoutingInterceptor
from grpc_support import SERVICE, App, dumps, loads, start_app
from processes import free_port

from balancer.bounded import BoundedLoadBalancer
from balancer.config import Config
from balancer.errors import ConfigError
from balancer.node import Node
from balancer.plugin import plugin_manager

KEYS = [f"user:{i}" for i in range(24)]


def who(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
    return channel.unary_unary(f"/{SERVICE}/Who", request_serializer=dumps, response_deserializer=loads)


def keyed(key: str, *more: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return ((KEY_METADATA, key), *more)


def plain(names: Sequence[str]) -> BoundedLoadBalancer:
    """Plain consistent hashing over ``names``: every server computes the same owners."""
    return BoundedLoadBalancer(names, load_factor=math.inf)


class Fleet:
    """App servers, each behind its own interceptor; closed at the end."""

    def __init__(self) -> None:
        self.apps: list[App] = []
        self.routers: list[RoutingInterceptor] = []
        self.channels: dict[str, grpc.aio.Channel] = {}

    async def start(self, make: Callable[[str, list[str]], RoutingInterceptor], count: int) -> list[App]:
        """``count`` servers on ports chosen first: ``make(address, addresses)`` makes the router of the
        server at ``address``, knowing every server's."""
        ports = [free_port() for _ in range(count)]
        addresses = [f"127.0.0.1:{p}" for p in ports]
        for port, address in zip(ports, addresses, strict=True):
            router = make(address, addresses)
            self.routers.append(router)
            self.apps.append(await start_app([router], port))
        return self.apps

    async def front(self, router: RoutingInterceptor) -> App:
        """One more server, behind ``router``."""
        self.routers.append(router)
        app = await start_app([router])
        self.apps.append(app)
        return app

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return self.channels[address]

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        for router in self.routers:
            await router.aclose()
        for app in self.apps:
            await app.server.stop(None)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    made = Fleet()
    try:
        yield made
    finally:
        await made.close()


def _static(extra: Sequence[str] = (), **options: Any) -> Callable[[str, list[str]], RoutingInterceptor]:
    """Routers over every server of the fleet (and ``extra`` names), each its own balancer."""

    def make(address: str, addresses: list[str]) -> RoutingInterceptor:
        return RoutingInterceptor(balancer=plain([*extra, *addresses]), local=address, **options)

    return make


def _others(**options: Any) -> Callable[[str, list[str]], RoutingInterceptor]:
    """Routers whose balancers name every server but their own: they disagree about every key."""

    def make(address: str, addresses: list[str]) -> RoutingInterceptor:
        return RoutingInterceptor(
            balancer=plain([a for a in addresses if a != address]), local=address, **options
        )

    return make


async def test_every_call_is_served_by_its_keys_owner_whichever_server_receives_it(fleet: Fleet) -> None:
    apps = await fleet.start(_static(), 3)
    names = [a.address for a in apps]
    reference = plain(names)
    owners = {reference.peek(key) for key in KEYS}
    assert len(owners) == 3  # the keys spread over every server
    for app in apps:
        for key in KEYS:
            answer = await who(fleet.channel(app.address))({"key": key}, metadata=keyed(key), timeout=10)
            owner = reference.peek(key)
            assert answer["served_by"] == owner
            assert answer["hops"] == (None if owner == app.address else "1")
    # a call without a key is served where it arrives
    for app in apps:
        assert (await who(fleet.channel(app.address))({}, timeout=10))["served_by"] == app.address
    # no load is left behind
    for router in fleet.routers:
        assert router.balancer is not None
        assert router.balancer.total_load == 0


async def test_a_key_from_the_request_and_streamed_calls_are_routed_too(fleet: Fleet) -> None:
    def request_key(method: str, request: Any) -> str | None:
        return request.get("key") if isinstance(request, dict) else None

    apps = await fleet.start(_static(request_key=request_key), 2)
    reference = plain([a.address for a in apps])
    key = next(k for k in KEYS if reference.peek(k) == apps[1].address)
    entry = fleet.channel(apps[0].address)
    # the key in the request: no metadata needed
    assert (await who(entry)({"key": key}, timeout=10))["served_by"] == apps[1].address
    # a streamed answer, forwarded as it streams
    count = entry.unary_stream(f"/{SERVICE}/Count", request_serializer=dumps, response_deserializer=loads)
    answers = [a async for a in count({"n": 5, "key": key}, timeout=10)]
    assert [a["i"] for a in answers] == list(range(5))
    assert {a["served_by"] for a in answers} == {apps[1].address}
    # streamed requests: routed by the metadata key
    total = entry.stream_unary(f"/{SERVICE}/Sum", request_serializer=dumps, response_deserializer=loads)

    async def numbers() -> AsyncIterator[dict[str, int]]:
        for n in range(1, 5):
            yield {"n": n}

    summed = await total(numbers(), metadata=keyed(key), timeout=10)
    assert summed == {"served_by": apps[1].address, "sum": 10}
    assert apps[1].echo.served == ["Who", "Count", "Sum"]
    assert apps[0].echo.served == []


async def test_two_servers_that_disagree_stop_at_max_hops(fleet: Fleet) -> None:
    # each one's balancer names only the other: without a shared secret, each routes what it receives
    apps = await fleet.start(_others(max_hops=2), 2)
    with pytest.raises(grpc.aio.AioRpcError) as looped:
        await who(fleet.channel(apps[0].address))({"key": "k"}, metadata=keyed("k"), timeout=10)
    assert looped.value.code() == grpc.StatusCode.ABORTED
    assert dict(looped.value.trailing_metadata() or ())["x-balancer-error"] == "LoopDetected"
    assert "forwarded 2 times" in (looped.value.details() or "")
    assert apps[0].echo.served == apps[1].echo.served == []
    # a hop count that is not a small number is refused before anything else
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await who(fleet.channel(apps[0].address))(
            {"key": "k"}, metadata=keyed("k", ("x-balancer-hops", "x1")), timeout=10
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_proven_forward_is_served_and_a_forged_hop_count_is_not_trusted(fleet: Fleet) -> None:
    apps = await fleet.start(_others(secret="shared"), 2)
    first, second = apps
    # the first chose the second and proved it: the second serves it, however its own balancer decides
    answer = await who(fleet.channel(first.address))({"key": "k"}, metadata=keyed("k"), timeout=10)
    assert answer == {"served_by": second.address, "key": "k", "hops": "1"}
    # a client's own hop count proves nothing: the second routes the call (to the first, with a proof)
    forged = keyed("k", ("x-balancer-hops", "1"))
    answer = await who(fleet.channel(second.address))({"key": "k"}, metadata=forged, timeout=10)
    assert answer == {"served_by": first.address, "key": "k", "hops": "2"}


async def test_an_unreachable_owner_is_unavailable_and_an_owners_error_comes_back_as_it_is(
    fleet: Fleet,
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    apps = await fleet.start(_static([dead]), 1)
    reference = plain([dead, apps[0].address])
    gone = next(k for k in KEYS if reference.peek(k) == dead)
    entry = fleet.channel(apps[0].address)
    with pytest.raises(grpc.aio.AioRpcError) as unreachable:
        await who(entry)({"key": gone}, metadata=keyed(gone), timeout=10)
    assert unreachable.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(unreachable.value.trailing_metadata() or ())["x-balancer-error"] == "BadGateway"
    assert dead in (unreachable.value.details() or "")

    owner = await start_app()
    fleet.apps.append(owner)
    front = await fleet.front(RoutingInterceptor(balancer=plain([owner.address])))
    fail = fleet.channel(front.address).unary_unary(
        f"/{SERVICE}/Fail", request_serializer=dumps, response_deserializer=loads
    )
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await fail({}, metadata=keyed("k"), timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == f"nothing here ({owner.address})"
    assert dict(failed.value.trailing_metadata() or ())["x-app"] == owner.address


async def test_a_slow_owner_times_out_and_a_forward_holds_one_load_while_in_flight(fleet: Fleet) -> None:
    owner = await start_app()
    fleet.apps.append(owner)
    hasty = RoutingInterceptor(balancer=plain([owner.address]), timeout=0.5)
    front = await fleet.front(hasty)
    slow = fleet.channel(front.address).unary_unary(
        f"/{SERVICE}/Slow", request_serializer=dumps, response_deserializer=loads
    )
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await slow({}, metadata=keyed("k"), timeout=10)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(late.value.trailing_metadata() or ())["x-balancer-error"] == "GatewayTimeout"
    assert hasty.balancer is not None
    assert hasty.balancer.total_load == 0

    patient = RoutingInterceptor(balancer=plain([owner.address]))
    front = await fleet.front(patient)
    slow = fleet.channel(front.address).unary_unary(
        f"/{SERVICE}/Slow", request_serializer=dumps, response_deserializer=loads
    )
    owner.echo.entered.clear()
    waiting = asyncio.ensure_future(slow({}, metadata=keyed("k"), timeout=30))
    await asyncio.wait_for(owner.echo.entered.wait(), 20)
    assert patient.balancer is not None
    assert patient.balancer.loads() == {owner.address: 1}
    owner.echo.release.set()
    assert (await waiting)["served_by"] == owner.address
    assert patient.balancer.total_load == 0


async def test_calls_are_routed_by_a_ring_of_nodes_on_the_grpc_transport(fleet: Fleet) -> None:
    pm = plugin_manager(load_entrypoints=False, plugins=[balancer_grpc])
    config = Config(transport="grpc", load_entrypoints=False, stabilize_interval=0.1, rpc_timeout=2.0)
    nodes: list[Node] = []
    try:
        for _ in range(3):
            nodes.append(await Node(config, pm=pm, join=nodes[0].address if nodes else None).start())
        service: dict[str, str] = {}  # a node's ring address -> its app server's address

        def make(address: str, addresses: list[str]) -> RoutingInterceptor:
            node = nodes[len(service)]
            service[node.address] = address
            return RoutingInterceptor(node=node, target=lambda ring: service[ring])

        apps = await fleet.start(make, 3)

        async def agreed() -> bool:  # every node names the same owner for every key: the ring formed
            owners = [[(await n.lookup(key)).owner for n in nodes] for key in KEYS[:12]]
            return all(len(set(found)) == 1 for found in owners)

        deadline = asyncio.get_running_loop().time() + 60
        while not await agreed():  # on a busy machine stabilization takes a while
            assert asyncio.get_running_loop().time() < deadline, "the three nodes never agreed on owners"
            await asyncio.sleep(0.1)
        for app in apps:
            for key in KEYS[:12]:
                owner = service[(await nodes[0].lookup(key)).owner.address]
                answer = await who(fleet.channel(app.address))({"key": key}, metadata=keyed(key), timeout=10)
                assert answer["served_by"] == owner
        for node in reversed(nodes):
            await node.leave()
    finally:
        for node in nodes:
            await node.close()


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        RoutingInterceptor()
    with pytest.raises(ConfigError, match="load_factor"):
        RoutingInterceptor(balancer=plain(["a:1"]), load_factor=1.25)
    with pytest.raises(ConfigError, match="max_hops"):
        RoutingInterceptor(balancer=plain(["a:1"]), max_hops=0)
