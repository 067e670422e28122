"""balancer-asgi under uvicorn: three FastAPI backends (uvicorn's httptools parser) and three Starlette
backends (its h11 parser), each a real server process on 127.0.0.1 with the routing middleware in front.

Run from the repository root (its pytest settings apply) after
``pip install -e 'contrib/balancer-asgi[test]'``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from asgi_cluster import SECRET, SLOW_TIMEOUT, Cluster, start
from yarl import URL

from balancer import BoundedLoadBalancer
from balancer.middleware import FORWARDED_HEADER, HOPS_HEADER, KEY_HEADER, setup_routing

BIG = hashlib.sha256(b"balancer-asgi").digest() * (5 * 1024 * 1024 // 32)
"""5 MiB that are not all alike, so a reordered or shifted chunk shows."""


@pytest.fixture(scope="module")
def fastapi_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three FastAPI backends under uvicorn (httptools), for the module's tests."""
    cluster = start("fastapi", "httptools", tmp_path_factory.mktemp("fastapi"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def starlette_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three Starlette backends under uvicorn (h11)."""
    cluster = start("starlette", "h11", tmp_path_factory.mktemp("starlette"))
    yield cluster
    cluster.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with a generous deadline (the machine may be busy); no redirect is followed."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str | URL, **kwargs: Any) -> tuple[int, Any]:
    async with http.get(url, allow_redirects=False, **kwargs) as resp:
        return resp.status, await resp.json()


def other_than(cluster: Cluster, owner: str) -> str:
    return next(b for b in cluster.backends if b != owner)


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    """``data`` as a streamed (chunked) request body."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


# -- FastAPI


async def test_each_key_reaches_its_owner_whichever_backend_it_enters(
    fastapi_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = fastapi_cluster
    for owner in cluster.backends:
        for key in cluster.keys(owner, 4):
            for entry in cluster.backends:
                status, body = await get_json(http, f"http://{entry}/users/{key}/profile?x=1")
                assert status == 200, (body, cluster.output())
                assert body == {
                    "user": key,
                    "served_by": owner,
                    "hops": "0" if entry == owner else "1",
                    "query": "x=1",
                }
            # the key in a header instead of the path
            entry = other_than(cluster, owner)
            status, body = await get_json(http, f"http://{entry}/whoami", headers={KEY_HEADER: key})
            assert body == {"served_by": owner, "hops": "1"}
    # without a key, a request is served where it arrives
    for entry in cluster.backends:
        assert await get_json(http, f"http://{entry}/whoami") == (200, {"served_by": entry, "hops": "0"})


async def test_bodies_stream_intact_both_ways(fastapi_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    cluster = fastapi_cluster
    for owner in cluster.backends:
        key = cluster.keys(owner, 1, prefix="body")[0]
        entry = other_than(cluster, owner)
        # streamed up (chunked, 5 MiB) and echoed back streamed (chunked) by the owner
        async with http.post(f"http://{entry}/echo/{key}", data=chunks(BIG)) as resp:
            assert resp.status == 200
            assert resp.headers["X-Served-By"] == owner
            assert await resp.read() == BIG
        # a sized body, small and large
        for size in (10, 200_000):
            async with http.post(f"http://{entry}/echo/{key}", data=BIG[:size]) as resp:
                assert resp.headers["X-Served-By"] == owner
                assert await resp.read() == BIG[:size]


async def test_hop_by_hop_headers_are_stripped_both_ways(
    fastapi_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = fastapi_cluster
    owner = cluster.backends[0]
    key = cluster.keys(owner, 1)[0]
    entry = cluster.backends[1]
    sent = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "named by Connection",
        "Keep-Alive": "300",
        "Proxy-Authorization": "Basic eDp5",
        "TE": "trailers",
        "X-Keep": "end to end",
        "X-Forwarded-For": "10.1.2.3",
    }
    async with http.get(f"http://{entry}/users/{key}/headers", headers=sent) as resp:
        assert resp.status == 200
        body = await resp.json()
        answer = resp.headers
        assert answer["X-End-To-End"] == "kept"
        for name in ("X-Private", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in answer, name
        assert "x-private" not in answer.get("Connection", "").lower()
        # the router's server writes Date and Server itself: the owner's are not added to them
        assert len(answer.getall("Server")) == 1
        assert len(answer.getall("Date")) == 1
    assert body["served_by"] == owner
    seen: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        seen.setdefault(name, []).append(value)
    for name in ("x-drop-me", "keep-alive", "proxy-authorization", "te"):
        assert name not in seen, name
    assert "x-drop-me" not in " ".join(seen.get("connection", [])).lower()
    assert seen["x-keep"] == ["end to end"]
    assert seen["host"] == [owner]
    assert seen[HOPS_HEADER.lower()] == ["1"]
    assert seen["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
    assert seen["x-forwarded-host"] == [entry]
    assert len(seen[FORWARDED_HEADER.lower()]) == 1


async def test_redirect_mode_answers_307_to_the_owner(
    fastapi_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = fastapi_cluster
    for owner in cluster.backends:
        key = cluster.keys(owner, 1, prefix="go")[0]
        entry = other_than(cluster, owner)
        target = URL(f"http://{entry}/go/{key}/profile?a=1&b=%2F", encoded=True)  # sent as it is written
        async with http.get(target, allow_redirects=False) as resp:
            assert resp.status == 307
            location = resp.headers["Location"]
        assert location == f"http://{owner}/go/{key}/profile?a=1&b=%2F"
        assert await get_json(http, URL(location, encoded=True)) == (
            200,
            {"served_by": owner, "query": "a=1&b=%2F"},
        )


async def test_a_dead_owner_gives_502_json(fastapi_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    cluster = fastapi_cluster
    key = cluster.keys(cluster.dead, 1)[0]
    status, body = await get_json(http, f"http://{cluster.backends[0]}/users/{key}/profile")
    assert status == 502
    assert body["error"]["type"] == "BadGateway"
    assert body["error"]["message"].startswith(f"the owner {cluster.dead} cannot be reached: ")


async def test_a_slow_owner_gives_504_json(fastapi_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    cluster = fastapi_cluster
    owner = cluster.backends[2]
    key = cluster.keys(owner, 1)[0]
    began = time.monotonic()
    status, body = await get_json(http, f"http://{cluster.backends[0]}/slow/{key}")
    took = time.monotonic() - began
    assert status == 504, body
    assert body == {
        "error": {
            "type": "GatewayTimeout",
            "message": f"the owner {owner} did not answer within {SLOW_TIMEOUT:g} s",
        }
    }
    assert took < 10 * SLOW_TIMEOUT  # the router gave up; the owner had not answered yet


async def test_a_forged_forwarded_header_does_not_skip_routing(
    fastapi_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = fastapi_cluster
    now = str(int(time.time() * 1000))
    for owner in cluster.backends:
        for key in cluster.keys(owner, 3, prefix="forged"):
            entry = other_than(cluster, owner)
            forged = {HOPS_HEADER: "1", FORWARDED_HEADER: f"{now}:{'0' * 64}"}
            status, body = await get_json(http, f"http://{entry}/users/{key}/profile", headers=forged)
            assert status == 200
            assert body["served_by"] == owner  # routed as if the headers were absent
            assert body["hops"] == "2"  # but counted for the loop guard


async def test_a_forwarding_loop_ends_in_508(fastapi_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    # each backend's /loop router sends everything to the next backend, and none serves a forward
    status, body = await get_json(http, f"http://{fastapi_cluster.backends[0]}/loop/anything")
    assert status == 508
    assert body == {
        "error": {"type": "LoopDetected", "message": "request forwarded 2 times already; not passing it on"}
    }


@pytest.mark.parametrize("hops", ["²", "-1", "1e3", "9999", "x"])
async def test_a_malformed_hop_count_is_400_json(
    fastapi_cluster: Cluster, http: aiohttp.ClientSession, hops: str
) -> None:
    url = f"http://{fastapi_cluster.backends[0]}/users/k/profile"
    status, body = await get_json(http, url, headers={HOPS_HEADER: hops})
    assert status == 400
    assert body["error"]["type"] == "BadRequestError"
    assert body["error"]["message"].startswith(f"{HOPS_HEADER} must be a number of hops (0 to 999), got ")


async def test_every_load_is_released(fastapi_cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """Loads are held while forwarding and given back however the exchange ended."""
    cluster = fastapi_cluster
    entry = cluster.backends[0]
    dead_key = cluster.keys(cluster.dead, 1, prefix="release")[0]
    assert (await get_json(http, f"http://{entry}/users/{dead_key}/profile"))[0] == 502
    slow_key = cluster.keys(cluster.backends[1], 1, prefix="release")[0]
    live = [key for owner in cluster.backends for key in cluster.keys(owner, 7, prefix="release")][:20]
    slow = asyncio.ensure_future(get_json(http, f"http://{entry}/slow/{slow_key}"))
    answers = await asyncio.gather(*(get_json(http, f"http://{entry}/users/{key}/profile") for key in live))
    # twenty at once fill their owners, and the overflow may go to the dead backend: 502, released too
    assert {status for status, _ in answers} <= {200, 502}
    assert (await slow)[0] == 504
    deadline = time.monotonic() + 30
    while True:  # a lease is released just after its answer went out: poll for it
        loads = [(await get_json(http, f"http://{b}/loads"))[1] for b in cluster.backends]
        if all(load == [0, 0, 0, 0] for load in loads):
            break
        assert time.monotonic() < deadline, loads
        await asyncio.sleep(0.05)


# -- Starlette


async def test_starlette_keys_reach_their_owners_and_bodies_arrive_intact(
    starlette_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = starlette_cluster
    for owner in cluster.backends:
        for key in cluster.keys(owner, 3):
            for entry in cluster.backends:
                status, body = await get_json(http, f"http://{entry}/users/{key}/profile")
                assert status == 200, (body, cluster.output())
                # served_by is set by the app's lifespan: the middleware passed it on
                assert body == {"user": key, "served_by": owner, "hops": "0" if entry == owner else "1"}
        key = cluster.keys(owner, 1)[0]
        entry = other_than(cluster, owner)
        assert await get_json(http, f"http://{entry}/whoami", headers={KEY_HEADER: key}) == (
            200,
            {"served_by": owner, "hops": "1"},
        )
        async with http.post(f"http://{entry}/echo/{key}", data=chunks(BIG)) as resp:
            assert resp.status == 200
            assert resp.headers["X-Served-By"] == owner
            assert await resp.read() == BIG


async def test_starlette_dead_owner_and_forged_forward(
    starlette_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    cluster = starlette_cluster
    status, body = await get_json(
        http, f"http://{cluster.backends[0]}/users/{cluster.keys(cluster.dead, 1)[0]}/profile"
    )
    assert status == 502
    assert body["error"]["type"] == "BadGateway"
    owner = cluster.backends[1]
    key = cluster.keys(owner, 1, prefix="forged")[0]
    forged = {HOPS_HEADER: "1", FORWARDED_HEADER: f"{int(time.time() * 1000)}:{'0' * 64}"}
    status, body = await get_json(http, f"http://{cluster.backends[0]}/users/{key}/profile", headers=forged)
    assert (status, body["served_by"], body["hops"]) == (200, owner, "2")


# -- interoperability


async def test_an_asgi_router_serves_what_an_aiohttp_router_forwarded(
    fastapi_cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """An aiohttp front door whose balancer names one backend only: that backend serves what it is sent
    if, and only if, it accepts the aiohttp router's proof (its own balancer names other owners)."""
    cluster = fastapi_cluster
    chosen = cluster.backends[0]
    keys = [k for owner in cluster.backends[1:] for k in cluster.keys(owner, 2, prefix="interop")]
    for secret, served_by in ((SECRET, chosen), ("not the backends' secret", None)):
        front = web.Application()
        setup_routing(front, balancer=BoundedLoadBalancer([chosen]), secret=secret)
        front.router.add_get("/users/{key}/profile", refuse)
        runner = web.AppRunner(front)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        try:
            await web.SockSite(runner, sock).start()
            for key in keys:
                target = f"/users/{key}/profile?q=a+b&r=%2F%20&s=%C3%A9"
                url = URL(f"http://127.0.0.1:{sock.getsockname()[1]}{target}", encoded=True)
                status, body = await get_json(http, url)
                assert status == 200
                assert body["served_by"] == (served_by or cluster.owner(key))
                assert body["query"] == "q=a+b&r=%2F%20&s=%C3%A9"
        finally:
            await runner.cleanup()
            sock.close()


async def refuse(request: web.Request) -> web.Response:
    """A front door serves nothing itself."""
    return web.Response(status=500)
