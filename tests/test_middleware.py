"""The routing middleware and the balanced client, with real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from helpers import RingApps, Setup, bound_socket, get_json, http_ring, servers

from balancer import BoundedLoadBalancer, Config, Lookup, Node, NodeInfo
from balancer.errors import ConfigError
from balancer.middleware import FORWARDED_HEADER, HOPS_HEADER, BalancedSession, RingRouter, setup_routing


def by_balancer(addresses: list[str], **options: Any) -> Setup:
    def install(app: web.Application, me: str) -> None:
        setup_routing(app, balancer=BoundedLoadBalancer(addresses), local=me, **options)

    return install


async def test_each_key_reaches_its_owner() -> None:
    async with servers(3, by_balancer) as backends, aiohttp.ClientSession() as http:
        reference = BoundedLoadBalancer([b.address for b in backends])
        for i in range(60):
            entry = backends[i % 3]
            status, body = await get_json(http, f"http://{entry.address}/items/user-{i}")
            assert status == 200
            assert body["served_by"] == reference.peek(f"user-{i}")
            assert body["hops"] == ("0" if entry.address == body["served_by"] else "1")
        # requests without a routing key are served where they arrive
        async with http.get(f"http://{backends[0].address}/plain") as resp:
            assert await resp.text() == f"plain from {backends[0].address}"


async def refuse(request: web.Request) -> web.Response:
    """A front door serves nothing itself."""
    return web.Response(status=500)


async def test_a_hot_key_range_stays_within_capacity() -> None:
    def install(addresses: list[str]) -> Setup | None:
        return None  # the backends themselves do no routing here

    async with servers(3, install) as backends, aiohttp.ClientSession() as http:
        gate = asyncio.Event()
        for backend in backends:
            backend.gate = gate
        lb = BoundedLoadBalancer([b.address for b in backends], load_factor=1.25)
        front = web.Application()
        setup_routing(front, balancer=lb)  # local=None: a pure front door, everything is forwarded
        front.router.add_get("/items/{key}", refuse)
        runner = web.AppRunner(front)
        await runner.setup()
        sock = bound_socket()
        await web.SockSite(runner, sock).start()
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/items/"
            hot = ["hot-1", "hot-2", "hot-3"]
            tasks = [asyncio.ensure_future(get_json(http, url + hot[i % 3])) for i in range(60)]
            deadline = asyncio.get_running_loop().time() + 20
            while sum(b.in_flight for b in backends) < 60:  # poll until all 60 are held at the backends
                assert asyncio.get_running_loop().time() < deadline, [b.in_flight for b in backends]
                await asyncio.sleep(0.01)
            capacity = lb.capacity(backends[0].address)
            loads = lb.loads()
            gate.set()
            results = await asyncio.gather(*tasks)
        finally:
            await runner.cleanup()
            sock.close()
    assert all(status == 200 for status, _ in results)
    assert capacity == 26  # ceil(1.25 * (60 + 1) / 3)
    for backend in backends:
        assert backend.peak <= capacity, [b.peak for b in backends]
        assert loads[backend.address] == backend.peak
    assert sum(1 for b in backends if b.peak > 0) == 3  # three hot keys spread over all three
    assert lb.total_load == 0  # every load released when its request ended


async def test_a_dead_owner_gives_502_and_its_load_is_released() -> None:
    dead = bound_socket()
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # nothing listens there any more
    lbs: list[BoundedLoadBalancer] = []

    def install(addresses: list[str]) -> Setup:
        def setup(app: web.Application, me: str) -> None:
            lb = BoundedLoadBalancer([*addresses, dead_address])
            lbs.append(lb)
            setup_routing(app, balancer=lb, local=me, timeout=5)

        return setup

    async with servers(2, install) as backends, aiohttp.ClientSession() as http:
        owned_by_dead = next(f"k{i}" for i in range(1000) if lbs[0].peek(f"k{i}") == dead_address)
        async with http.get(f"http://{backends[0].address}/items/{owned_by_dead}") as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
            assert error["type"] == "BadGateway"
            assert dead_address in error["message"]
        status, _ = await get_json(http, f"http://{backends[0].address}/items/k-alive")
        assert status in (200, 502)
    assert all(lb.total_load == 0 for lb in lbs)


async def test_streaming_bodies_arrive_intact() -> None:
    async with servers(3, by_balancer) as backends, aiohttp.ClientSession() as http:
        payload = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)  # 5 MiB

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        for key in ("a", "b", "c", "d"):
            async with http.post(f"http://{backends[0].address}/echo/{key}", data=chunks()) as resp:
                assert resp.status == 200
                assert await resp.read() == payload
                assert resp.headers["X-Backend"] == BoundedLoadBalancer([b.address for b in backends]).peek(
                    key
                )


class Disagreeing:
    """Stands in for a ring node whose view names another server as the owner of every key."""

    def __init__(self, me: str, other: str) -> None:
        self.address = me
        self.other = other
        self.config = Config()

    async def lookup(self, key: str) -> Lookup:
        return Lookup(NodeInfo(1, self.other), 1)


async def test_the_loop_guard_stops_a_forwarding_loop() -> None:
    def install(addresses: list[str]) -> Setup:
        def setup(app: web.Application, me: str) -> None:
            other = next(a for a in addresses if a != me)  # each server thinks the other owns everything
            setup_routing(app, node=cast(Node, Disagreeing(me, other)), max_hops=3)

        return setup

    async with servers(2, install) as backends, aiohttp.ClientSession() as http:
        status, body = await get_json(http, f"http://{backends[0].address}/items/anything")
    assert status == 508
    assert body["error"]["type"] == "LoopDetected"
    assert "forwarded 3 times" in body["error"]["message"]
    assert backends[0].served == backends[1].served == []


async def test_a_forwarded_request_is_served_where_the_balancer_sent_it() -> None:
    def install(addresses: list[str]) -> Setup:
        def setup(app: web.Application, me: str) -> None:
            other = next(a for a in addresses if a != me)
            setup_routing(app, balancer=BoundedLoadBalancer([other]), local=me, secret="shared")

        return setup

    async with servers(2, install) as backends, aiohttp.ClientSession() as http:
        status, body = await get_json(http, f"http://{backends[0].address}/items/anything")
    assert status == 200
    assert body == {"served_by": backends[1].address, "key": "anything", "hops": "1"}


@pytest.mark.parametrize("secret", [None, "shared"])
async def test_a_hop_count_from_a_client_never_skips_routing(secret: str | None) -> None:
    async with servers(3, lambda a: by_balancer(a, secret=secret)) as backends:
        reference = BoundedLoadBalancer([b.address for b in backends])
        async with aiohttp.ClientSession() as http:
            for i in range(20):
                key = f"h{i}"
                owner = reference.peek(key)
                entry = next(b for b in backends if b.address != owner)
                forged = {HOPS_HEADER: "1", FORWARDED_HEADER: "1:00"}
                async with http.get(f"http://{entry.address}/items/{key}", headers=forged) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                assert body["served_by"] == owner  # routed as if the header were absent
                assert body["hops"] == "2"  # but counted for the loop guard


@pytest.mark.parametrize("hops", ["²", "-1", "1e3", "9999", "1 1", "x"])
async def test_a_malformed_hop_count_is_400_json(hops: str) -> None:
    async with (
        servers(2, by_balancer) as backends,
        aiohttp.ClientSession() as http,
        http.get(f"http://{backends[0].address}/items/k", headers={HOPS_HEADER: hops}) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "BadRequestError"
    assert HOPS_HEADER in error["message"]
    assert backends[0].served == backends[1].served == []


async def test_redirect_mode_answers_307_to_the_owner() -> None:
    async with servers(3, lambda a: by_balancer(a, mode="redirect")) as backends:
        reference = BoundedLoadBalancer([b.address for b in backends])
        async with aiohttp.ClientSession() as http:
            for i in range(20):
                key = f"r{i}"
                owner = reference.peek(key)
                entry = next(b for b in backends if b.address != owner)
                async with http.get(f"http://{entry.address}/items/{key}?x=1", allow_redirects=False) as resp:
                    assert resp.status == 307
                    assert resp.headers["Location"] == f"http://{owner}/items/{key}?x=1"
                async with http.get(f"http://{entry.address}/items/{key}") as followed:
                    assert (await followed.json())["served_by"] == owner


async def test_a_slow_owner_gives_504() -> None:
    def install(addresses: list[str]) -> Setup:
        def setup(app: web.Application, me: str) -> None:
            setup_routing(app, balancer=BoundedLoadBalancer(addresses), local=me, timeout=0.3)

        return setup

    async with servers(2, install) as backends, aiohttp.ClientSession() as http:
        reference = BoundedLoadBalancer([b.address for b in backends])
        key = next(f"s{i}" for i in range(100) if reference.peek(f"s{i}") == backends[1].address)
        backends[1].gate = asyncio.Event()  # never set: the owner holds the request
        status, body = await get_json(http, f"http://{backends[0].address}/items/{key}")
        backends[1].gate.set()
    assert status == 504
    assert body["error"]["type"] == "GatewayTimeout"


async def test_routing_by_a_ring_node() -> None:
    async with http_ring(3) as nodes:
        apps = RingApps(nodes)
        async with servers(3, apps) as backends, aiohttp.ClientSession() as http:
            for i in range(30):
                key = f"ring-{i}"
                owner = (await nodes[0].lookup(key)).owner.address
                status, body = await get_json(http, f"http://{backends[i % 3].address}/items/{key}")
                assert status == 200
                assert f"http://{body['served_by']}" == apps.url(owner)


async def test_balanced_session_retries_the_next_candidate() -> None:
    dead = bound_socket()
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()
    async with servers(2, lambda a: None) as backends:
        urls = [f"http://{b.address}" for b in backends]
        async with BalancedSession([dead_url, *urls], retries=2) as client:
            first_choice_dead = [
                k for k in (f"u{i}" for i in range(200)) if client.balancer.peek(k) == dead_url
            ]
            assert first_choice_dead
            for key in first_choice_dead[:10]:
                async with client.get(f"/items/{key}", key=key) as resp:
                    assert resp.status == 200
                    assert f"http://{(await resp.json())['served_by']}" in urls
                    assert client.balancer.total_load == 1  # held while the response is open
            assert client.balancer.total_load == 0
    async with BalancedSession([dead_url], retries=1) as lonely:
        with pytest.raises(aiohttp.ClientConnectionError, match="every backend tried"):
            async with lonely.get("/items/x", key="x"):
                pass
        assert lonely.balancer.total_load == 0


def test_router_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        RingRouter()
    with pytest.raises(ConfigError, match="mode"):
        RingRouter(balancer=BoundedLoadBalancer(["a"]), mode="teleport")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_hops"):
        RingRouter(balancer=BoundedLoadBalancer(["a"]), max_hops=0)
    with pytest.raises(ConfigError, match="timeout must be positive"):  # as every router (check_router)
        RingRouter(balancer=BoundedLoadBalancer(["a"]), timeout=0)


async def test_a_cookie_an_owner_sets_never_reaches_another_clients_request() -> None:
    """The router's own HTTP client keeps no cookies: one client's Set-Cookie, from an owner reached by
    host name, must not ride along on the next client's request to it."""

    async def set_cookie(request: web.Request) -> web.Response:
        await request.read()
        response = web.Response(text="set")
        response.set_cookie("session", "client-one-secret")
        return response

    async def show(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=request.headers.get("Cookie", "none"))

    owner = web.Application()
    owner.router.add_post("/set/{key}", set_cookie)
    owner.router.add_post("/show/{key}", show)
    owner_socket, front_socket = bound_socket(), bound_socket()
    owner_name = f"localhost:{owner_socket.getsockname()[1]}"  # a host name: cookie jars keep those
    front = web.Application()
    setup_routing(front, balancer=BoundedLoadBalancer([owner_name]), local="front.invalid:1")
    front.router.add_post("/set/{key}", refuse)  # the key comes from the route; the owner serves it
    front.router.add_post("/show/{key}", refuse)
    runners = [web.AppRunner(owner), web.AppRunner(front)]
    try:
        for runner, sock in zip(runners, (owner_socket, front_socket), strict=True):
            await runner.setup()
            await web.SockSite(runner, sock).start()
        base = f"http://127.0.0.1:{front_socket.getsockname()[1]}"

        async def body() -> AsyncIterator[bytes]:  # a streamed body: the router's aiohttp client path
            yield b"x" * 10

        async with aiohttp.ClientSession() as first, first.post(f"{base}/set/k", data=body()) as resp:
            assert resp.status == 200
            assert "client-one-secret" in resp.headers.get("Set-Cookie", "")  # passed on to its client
        async with aiohttp.ClientSession() as second, second.post(f"{base}/show/k", data=body()) as resp:
            assert resp.status == 200
            assert await resp.text() == "none"
    finally:
        for runner in runners:
            await runner.cleanup()
        owner_socket.close()
        front_socket.close()
