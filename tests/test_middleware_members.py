"""Bounded-load routing over a ring's live members: ``load_factor`` with a ring node, in the middleware and
in ``BalancedSession``, on real nodes and real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import aiohttp
import pluggy
import pytest
from aiohttp import web
from helpers import HTTP_RING, Backend, RingApps, Setup, get_json, http_ring, servers, until

from balancer import BoundedLoadBalancer, Config, Lease, Lookup, Member, Node, NodeInfo
from balancer.errors import ConfigError, RingError
from balancer.middleware import BalancedSession, MemberBalancer, RingRouter, setup_routing

Answer = tuple[int, Any]


class StandIn:
    """Stands in for a ring node: an address, a plugin manager, the membership view a test sets, and one
    owner for every key. ``address`` raises like a node's before it starts while ``started`` is false."""

    def __init__(self, pm: pluggy.PluginManager, address: str, owner: str | None = None) -> None:
        self.pm = pm
        self._address = address
        self.owner = owner or address
        self.view: tuple[Member, ...] = ()
        self.started = True
        self.config = Config(cluster_secret="stand-in secret")

    @property
    def address(self) -> str:
        if not self.started:
            raise RingError("the node has not started")
        return self._address

    def members(self) -> tuple[Member, ...]:
        return self.view

    async def lookup(self, key: str) -> Lookup:
        return Lookup(NodeInfo(1, self.owner), 1)

    def announce(self, *addresses: str) -> None:
        """Change the view to these members (all up) and fire the event, as a node does."""
        self.view = tuple(Member(a) for a in sorted(addresses))
        self.pm.hook.balancer_membership_changed(node=NodeInfo(1, self._address), members=self.view)


@asynccontextmanager
async def held(
    send: Callable[[], Awaitable[Answer]], count: int, backends: list[Backend]
) -> AsyncIterator[None]:
    """``count`` concurrent ``send()`` s, held at ``backends`` for the ``async with`` block; then released,
    and every one must answer 200. One that answers while the others are held fails the test at once."""
    gate = asyncio.Event()
    for backend in backends:
        backend.gate = gate
    tasks = [asyncio.ensure_future(send()) for _ in range(count)]

    def all_held() -> bool:
        early = [t.result() for t in tasks if t.done()]
        assert not early, f"answered before the gate opened: {early[:3]}"
        return sum(b.in_flight for b in backends) == count

    try:
        await until(all_held, f"{count} requests held at the backends")
        yield
    except BaseException:
        gate.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        for backend in backends:
            backend.gate = None
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert [status for status, _ in answers] == [200] * count, answers


def in_flight(apps: RingApps, backends: list[Backend]) -> dict[str, int]:
    """Requests each application holds now, by the ring address of the node beside it."""
    by_app = {b.address: b.in_flight for b in backends}
    return {ring: by_app[app] for ring, app in apps.app_of.items()}


def balancer_of(router: RingRouter) -> BoundedLoadBalancer:
    """The balancer over the ring's members a router keeps (it must have a ``load_factor``)."""
    assert router.members is not None
    return router.members.balancer


# -- MemberBalancer, with fabricated views --------------------------------------------------------


def test_the_balancer_holds_the_live_members_by_address_and_weight(pm: pluggy.PluginManager) -> None:
    node = StandIn(pm, "10.0.0.1:9000")
    node.view = (
        Member("10.0.0.1:9000", ids=(5, 77, 901)),  # several ring ids, one process: one balancer node
        Member("10.0.0.2:9000", weight=2.0, state="suspect"),
        Member("10.0.0.3:9000", state="down"),
        Member("10.0.0.4:9000", state="leaving"),
    )
    members = MemberBalancer(cast(Node, node), load_factor="125%")
    assert len(members.balancer) == 0  # nothing before it starts
    members.start()
    try:
        assert members.balancer.nodes == ["10.0.0.1:9000", "10.0.0.2:9000"]
        assert members.balancer.weight("10.0.0.2:9000") == 2.0
        assert members.balancer.load_factor == 1.25
        members.update([Member("10.0.0.1:9000"), Member("10.0.0.2:9000", weight=3.0)])
        assert members.balancer.weight("10.0.0.2:9000") == 3.0
    finally:
        members.stop()


def test_membership_changes_keep_the_loads_of_members_that_stay(pm: pluggy.PluginManager) -> None:
    a, b, c, d = (f"10.0.0.{i}:9000" for i in range(1, 5))
    members = MemberBalancer(cast(Node, StandIn(pm, a)), load_factor=1.25)
    lb = members.balancer
    members.update([Member(a), Member(b), Member(c)])
    rng = random.Random(11)
    leases = [Lease(key, lb.acquire(key)) for key in (f"k{rng.randrange(40)}" for _ in range(90))]

    def expected(before: dict[str, int], moves: list[Any]) -> dict[str, int]:
        loads = dict(before)
        for move in moves:
            loads[move.source] -= 1
            loads[move.target] = loads.get(move.target, 0) + 1
        return loads

    before = lb.loads()
    assert min(before.values()) > 0
    assert members.update([Member(a), Member(b), Member(c, state="suspect")]) == []  # still live
    assert lb.loads() == before

    moves = members.update([Member(a), Member(b)])  # c left: its load goes to a and b, theirs stays
    assert len(moves) == before[c]
    assert {m.source for m in moves} == {c}
    after = lb.loads()
    assert after == {n: v for n, v in expected(before, moves).items() if n != c}
    assert after[a] >= before[a]
    assert after[b] >= before[b]
    assert lb.total_load == 90

    before = after
    moves = members.update([Member(a), Member(b), Member(d)])  # d joined: only moves shift load
    assert lb.loads() == expected({**before, d: 0}, moves)
    for name in (a, b, d):
        assert lb.loads()[name] <= lb.capacity(name)
    assert lb.total_load == 90

    for lease in leases:  # leases taken on c, which left, are released too
        lb.release(lease)
    assert lb.total_load == 0


def test_only_the_nodes_own_view_counts(pm: pluggy.PluginManager) -> None:
    node = StandIn(pm, "10.0.0.1:9000")
    node.view = (Member("10.0.0.1:9000"),)
    members = MemberBalancer(cast(Node, node))
    members.start()
    try:
        # another node sharing the plugin manager reports its own view: not ours
        pm.hook.balancer_membership_changed(
            node=NodeInfo(2, "10.0.0.2:9000"), members=(Member("10.0.0.2:9000"),)
        )
        assert members.balancer.nodes == ["10.0.0.1:9000"]
        # any of this process's ring ids speaks for it
        pm.hook.balancer_membership_changed(
            node=NodeInfo(99, "10.0.0.1:9000"), members=(Member("10.0.0.1:9000"), Member("10.0.0.3:9000"))
        )
        assert members.balancer.nodes == ["10.0.0.1:9000", "10.0.0.3:9000"]
        members.balancer_membership_changed(NodeInfo(1, "10.0.0.1:9000"), ())
        assert members.balancer.nodes == []
        node.started = False  # a node that has not started has no events of its own
        members.balancer_membership_changed(NodeInfo(1, "10.0.0.1:9000"), (Member("10.0.0.1:9000"),))
        assert members.balancer.nodes == []
    finally:
        members.stop()
    assert not pm.is_registered(members)


def test_load_factor_arguments_are_checked(pm: pluggy.PluginManager) -> None:
    node = cast(Node, StandIn(pm, "10.0.0.1:9000"))
    assert RingRouter(node=node).members is None  # no load factor: the key's owner, as before
    members = RingRouter(node=node, load_factor=125).members
    assert members is not None
    assert members.balancer.load_factor == 1.25
    assert not members.started  # it follows the node only while the application runs
    with pytest.raises(ConfigError, match="load factor"):
        RingRouter(node=node, load_factor=0.9)
    with pytest.raises(ConfigError, match="with node="):
        RingRouter(balancer=BoundedLoadBalancer(["a"]), load_factor=1.25)
    with pytest.raises(ConfigError, match="exactly one"):
        BalancedSession()
    with pytest.raises(ConfigError, match="exactly one"):
        BalancedSession(["http://a"], node=node)
    session = BalancedSession(node=node, load_factor="125%")
    assert session.balancer.load_factor == 1.25
    assert session.backend_url("10.0.0.2:9000") == "http://10.0.0.2:9000"
    assert BalancedSession(["http://a"]).backend_url("http://a") == "http://a"


# -- the router, with fabricated views -------------------------------------------------------------


def front_of(node: StandIn, routers: list[RingRouter]) -> Callable[[list[str]], Setup]:
    """Routing with ``load_factor`` on the first application only, as ``node``; the others only serve."""

    def install(addresses: list[str]) -> Setup:
        def setup(app: web.Application, me: str) -> None:
            if me == addresses[0]:
                node._address = me
                routers.append(setup_routing(app, node=cast(Node, node), load_factor=1.25))

        return setup

    return install


async def test_the_router_follows_the_view_and_keeps_the_loads_of_members_that_stay(
    pm: pluggy.PluginManager,
) -> None:
    node = StandIn(pm, "unset")
    routers: list[RingRouter] = []
    async with servers(3, front_of(node, routers)) as backends, aiohttp.ClientSession() as http:
        entry, second, third = backends
        node.owner = second.address
        lb = balancer_of(routers[0])
        assert len(lb) == 0
        assert routers[0].members is not None
        assert routers[0].members.started
        # no view yet: the key's owner, as the ring says
        status, body = await get_json(http, f"http://{entry.address}/items/hot")
        assert (status, body["served_by"]) == (200, second.address)

        node.announce(entry.address, second.address, third.address)
        assert sorted(lb.nodes) == sorted(b.address for b in backends)
        url = f"http://{entry.address}/items/hot"
        async with held(lambda: get_json(http, url), 30, backends):
            before = lb.loads()
            assert before == {b.address: b.in_flight for b in backends}
            assert sum(1 for load in before.values() if load) > 1  # the hot key overflowed
            node.announce(entry.address, second.address)  # the third left while requests are in flight
            after = lb.loads()
            assert set(after) == {entry.address, second.address}
            assert after[entry.address] >= before[entry.address]
            assert after[second.address] >= before[second.address]
            assert lb.total_load == 30
        assert lb.total_load == 0
        third.served.clear()
        async with held(lambda: get_json(http, url), 30, [entry, second]):
            assert entry.in_flight
            assert second.in_flight
        assert third.served == []


# -- real rings ----------------------------------------------------------------------------------


async def test_a_hot_keys_overflow_spreads_over_the_ring_within_capacity() -> None:
    async with http_ring(3) as nodes:
        apps = RingApps(nodes, load_factor=1.25)
        async with servers(3, apps) as backends, aiohttp.ClientSession() as http:
            entry = backends[0]
            lb = balancer_of(apps.routers[entry.address])
            assert sorted(lb.nodes) == sorted(n.address for n in nodes)
            url = f"http://{entry.address}/items/hot"
            async with held(lambda: get_json(http, url), 30, backends):
                loads = lb.loads()
                capacity = {address: lb.capacity(address) for address in loads}
                serving = in_flight(apps, backends)
                others = [balancer_of(apps.routers[b.address]).total_load for b in backends[1:]]
            assert lb.total_load == 0  # every load released when its request ended
    assert serving == loads  # each request counted where it is served
    assert set(capacity.values()) == {13}  # ceil(1.25 * (30 + 1) / 3)
    assert all(serving[address] <= capacity[address] for address in serving), serving
    assert max(b.peak for b in backends) <= 13
    assert sum(1 for count in serving.values() if count) > 1  # more than one member served the hot key
    assert others == [0, 0]  # a proven forward is served where it lands, not balanced again


async def test_without_a_load_factor_a_hot_key_stays_on_its_owner() -> None:
    async with http_ring(3) as nodes:
        apps = RingApps(nodes)
        async with servers(3, apps) as backends, aiohttp.ClientSession() as http:
            assert all(router.members is None for router in apps.routers.values())
            owner = (await nodes[0].lookup("hot")).owner.address
            url = f"http://{backends[0].address}/items/hot"
            async with held(lambda: get_json(http, url), 30, backends):
                serving = in_flight(apps, backends)
    assert serving[owner] == 30


@asynccontextmanager
async def joiner(nodes: list[Node], apps: RingApps) -> AsyncIterator[tuple[Node, Backend]]:
    """A node that joins ``nodes``' ring, with a plain application (no routing) beside it."""
    async with servers(1, lambda addresses: None) as (backend,):
        node = Node(Config(**HTTP_RING), join=nodes[0].address)
        try:
            await node.start()
            apps.app_of[node.address] = backend.address
            yield node, backend
        finally:
            await node.close()


async def test_a_member_that_joins_takes_its_share_and_the_others_keep_their_loads() -> None:
    async with http_ring(2) as nodes:
        apps = RingApps(nodes, load_factor=1.25)
        async with (
            servers(2, apps) as backends,
            aiohttp.ClientSession() as http,
            contextlib.AsyncExitStack() as stack,
        ):
            lb = balancer_of(apps.routers[backends[0].address])
            url = f"http://{backends[0].address}/items/hot"
            async with held(lambda: get_json(http, url), 30, backends):
                before = lb.loads()
                new, beside = await stack.enter_async_context(joiner(nodes, apps))
                await until(lambda: new.address in lb, "the router adding the member that joined")
                after = lb.loads()
                capacity = {address: lb.capacity(address) for address in after}
                assert lb.total_load == 30
                # what a member held stays, except what no longer fits its smaller share
                for address, load in before.items():
                    assert after[address] >= min(load, capacity[address]), (before, after)
            assert lb.total_load == 0
            everyone = [*backends, beside]
            async with held(lambda: get_json(http, url), 30, everyone):
                serving = {b.address: b.in_flight for b in everyone}
    # ceil(1.25 * 31 / 3) = 13 each: two members cannot hold 30, the new one serves its share
    assert all(0 < count <= 13 for count in serving.values()), serving


async def test_the_router_stops_following_the_node_on_cleanup() -> None:
    async with http_ring(1) as (node,):
        app = web.Application()
        router = setup_routing(app, node=node, load_factor=1.25)
        members = router.members
        assert members is not None
        assert not node.pm.is_registered(members)
        runner = web.AppRunner(app)
        await runner.setup()  # runs the cleanup context's start-up
        try:
            assert node.pm.is_registered(members)
            assert members.balancer.nodes == [node.address]
        finally:
            await runner.cleanup()
        assert not node.pm.is_registered(members)
        implementers = [impl.plugin for impl in node.pm.hook.balancer_membership_changed.get_hookimpls()]
        assert members not in implementers


# -- BalancedSession -----------------------------------------------------------------------------


async def test_balanced_session_over_a_ring_node() -> None:
    async with http_ring(2) as nodes:
        apps = RingApps(nodes, routing=False)
        async with servers(2, apps) as backends:
            client = BalancedSession(node=nodes[0], load_factor=1.25, backend_url=apps.url)
            members = client.members
            assert members is not None
            async with client:
                lb = client.balancer
                assert node_registered(nodes[0], members)
                assert sorted(lb.nodes) == sorted(n.address for n in nodes)

                async def fetch() -> Answer:
                    async with client.get("/items/hot", key="hot") as response:
                        return response.status, await response.json()

                async with held(fetch, 30, backends):
                    serving = in_flight(apps, backends)
                    assert serving == lb.loads()
                    assert all(count <= lb.capacity(address) for address, count in serving.items())
                    assert all(serving.values())  # ceil(1.25 * 31 / 2) = 20: the owner alone cannot
                assert lb.total_load == 0

                async with joiner(nodes, apps) as (new, beside):
                    await until(lambda: new.address in lb, "the session adding the member that joined")
                    everyone = [*backends, beside]
                    async with held(fetch, 30, everyone):
                        serving = {b.address: b.in_flight for b in everyone}
                    assert all(0 < count <= 13 for count in serving.values()), serving
                assert lb.total_load == 0
            assert not node_registered(nodes[0], members)  # closing stops following the node


def node_registered(node: Node, members: MemberBalancer) -> bool:
    """Whether ``members`` hears ``node``'s membership events."""
    return any(impl.plugin is members for impl in node.pm.hook.balancer_membership_changed.get_hookimpls())


async def test_balanced_session_sends_to_the_owner_until_the_node_has_a_view(
    pm: pluggy.PluginManager,
) -> None:
    async with servers(2, lambda addresses: None) as backends:
        node = StandIn(pm, backends[0].address, owner=backends[1].address)
        async with BalancedSession(node=cast(Node, node)) as client:
            async with client.get("/items/k", key="k") as response:
                assert (await response.json())["served_by"] == backends[1].address
            node.announce(backends[0].address)
            async with client.get("/items/k", key="k") as response:
                assert (await response.json())["served_by"] == backends[0].address
                assert client.balancer.loads() == {backends[0].address: 1}
            node.announce(backends[0].address, backends[1].address)
            async with client.get("/items/k", key="k") as response:
                first = (await response.json())["served_by"]
            other = next(b.address for b in backends if b.address != first)
            node.announce(other)  # the first choice left: the key goes to the one that stays
            async with client.get("/items/k", key="k") as response:
                assert (await response.json())["served_by"] == other
            assert client.balancer.total_load == 0
