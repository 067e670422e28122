"""Signed RPCs, the API token and TLS, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from conftest import Pki
from helpers import addresses

from balancer.auth import DESTINATION, NONCE, SIGNATURE, TIMESTAMP, ReplayGuard, signed_headers
from balancer.config import Config
from balancer.errors import IncompatibleConfigError, PeerUnreachableError, UnauthorizedError
from balancer.hookspecs import Payload, PublicApi
from balancer.node import Node
from balancer.plugins.aiohttp_transport import AiohttpTransport, rpc_exposure

SECRET = "correct horse battery staple"


class Box(PublicApi):
    """A dict behind the public API."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes:
        return self.data[key]

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    async def delete(self, key: str) -> None:
        del self.data[key]

    async def status(self) -> Payload:
        return {"keys": len(self.data)}


@pytest.fixture
async def server() -> AsyncIterator[tuple[AiohttpTransport, list[Payload], Box]]:
    """A transport serving a 'remember' RPC that records its payloads, with a cluster secret and token."""
    seen: list[Payload] = []

    async def remember(payload: Payload) -> Payload:
        seen.append(payload)
        return {"count": len(seen)}

    transport = AiohttpTransport(Config(cluster_secret=SECRET, api_token="t0ken"))
    box = Box()
    port = await transport.serve("127.0.0.1", 0, {"remember": remember}, api=box)
    transport.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield transport, seen, box
    finally:
        await transport.aclose()


async def test_signed_calls_pass_and_others_change_nothing(
    server: tuple[AiohttpTransport, list[Payload], Box],
) -> None:
    transport, seen, _ = server
    address: str = transport.address  # type: ignore[attr-defined]
    async with AiohttpTransport(Config(cluster_secret=SECRET)) as good:
        assert await good.call(address, "remember", {"n": 1}, 2.0) == {"count": 1}
    for secret in (None, "wrong secret"):
        async with AiohttpTransport(Config(cluster_secret=secret)) as bad:
            with pytest.raises(UnauthorizedError):
                await bad.call(address, "remember", {"n": 2}, 2.0)
    assert seen == [{"n": 1}]


async def test_replays_stale_and_tampered_requests_get_401(
    server: tuple[AiohttpTransport, list[Payload], Box],
) -> None:
    transport, seen, _ = server
    url = f"http://{transport.address}/rpc/remember"  # type: ignore[attr-defined]
    body = orjson.dumps({"n": 1})
    address: str = transport.address  # type: ignore[attr-defined]
    headers = signed_headers(SECRET, "remember", address, body)
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
        async with http.post(url, data=body, headers=headers) as resp:  # the same request again
            assert resp.status == 401
            assert "replayed" in (await resp.json())["error"]["message"]
        old = signed_headers(SECRET, "remember", address, body, now=1_000_000_000)
        async with http.post(url, data=body, headers=old) as resp:
            assert resp.status == 401
            assert "timestamp" in (await resp.json())["error"]["message"]
        fresh = signed_headers(SECRET, "remember", address, body)
        async with http.post(url, data=orjson.dumps({"n": 666}), headers=fresh) as resp:
            assert resp.status == 401
        other = signed_headers(SECRET, "remember", address, body)
        async with http.post(url.replace("remember", "forget"), data=body, headers=other) as resp:
            assert resp.status == 401  # the signature covers the method
        async with http.post(url, data=body) as resp:
            assert resp.status == 401
        bad_json = b"{nope"
        async with http.post(
            url, data=bad_json, headers=signed_headers(SECRET, "remember", address, bad_json)
        ) as resp:
            assert resp.status == 400  # signed but malformed: refused, nothing changed
    assert seen == [{"n": 1}]


async def test_the_api_token_guards_kv_and_status(
    server: tuple[AiohttpTransport, list[Payload], Box],
) -> None:
    transport, _, box = server
    base = f"http://{transport.address}"  # type: ignore[attr-defined]
    auth = {"Authorization": "Bearer t0ken"}
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/kv/k", data=b"v") as resp:
            assert resp.status == 401
        async with http.put(f"{base}/kv/k", data=b"v", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
        assert box.data == {}
        async with http.put(f"{base}/kv/k", data=b"v", headers=auth) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/kv/k", headers=auth) as resp:
            assert await resp.read() == b"v"
        async with http.get(f"{base}/status") as resp:
            assert resp.status == 401


def test_replay_guard_window() -> None:
    now = [940.0]
    guard = ReplayGuard(SECRET, max_skew=30, clock=lambda: now[0], destinations=["n:1"])
    now[0] += 60  # the guard started a minute ago
    headers = signed_headers(SECRET, "m", "n:1", b"{}", now=now[0])
    guard.check("m", headers, b"{}")
    with pytest.raises(UnauthorizedError, match="replayed"):
        guard.check("m", headers, b"{}")
    late = signed_headers(SECRET, "m", "n:1", b"{}", now=now[0] - 31)
    with pytest.raises(UnauthorizedError, match="off"):
        guard.check("m", late, b"{}")
    with pytest.raises(UnauthorizedError, match="not signed"):
        guard.check("m", {TIMESTAMP: "1", NONCE: "x"}, b"{}")
    with pytest.raises(UnauthorizedError, match="does not match"):
        guard.check("m", {DESTINATION: "n:1", TIMESTAMP: "1", NONCE: "x", SIGNATURE: "00"}, b"{}")


def test_the_replay_guard_forgets_nonces_it_no_longer_needs() -> None:
    now = [1000.0]
    guard = ReplayGuard(SECRET, max_skew=30, clock=lambda: now[0], destinations=["n:1"])
    first = signed_headers(SECRET, "m", "n:1", b"{}", now=now[0])
    guard.check("m", first, b"{}")
    for _ in range(3000):  # 100 requests a second for 30 s
        now[0] += 0.01
        guard.check("m", signed_headers(SECRET, "m", "n:1", b"{}", now=now[0]), b"{}")
    with pytest.raises(UnauthorizedError, match="replayed"):  # still within the window: remembered
        guard.check("m", first, b"{}")
    for _ in range(3000):
        now[0] += 0.02
        guard.check("m", signed_headers(SECRET, "m", "n:1", b"{}", now=now[0]), b"{}")
    assert len(guard._seen) <= 3001  # only the last two skew windows (60 s) of nonces are kept
    with pytest.raises(UnauthorizedError, match="off"):  # forgotten, and refused by its age instead
        guard.check("m", first, b"{}")


async def test_a_node_without_the_secret_cannot_join() -> None:
    secured = Config(cluster_secret=SECRET, load_entrypoints=False, replicas=1, write_quorum=1, read_quorum=1)
    async with Node(secured) as first:
        intruder = Node(secured.evolve(cluster_secret="guess"), join=first.address)
        with pytest.raises(UnauthorizedError):
            await intruder.start()
        assert intruder.stopped
        async with Node(secured, join=first.address) as friend:
            await friend.put("k", b"v")
            assert await first.get("k") == b"v"


async def test_signing_and_open_nodes_never_share_a_ring() -> None:
    solo = {"load_entrypoints": False, "replicas": 1, "write_quorum": 1, "read_quorum": 1}
    open_ring = Config(**solo)  # type: ignore[arg-type]
    signing = open_ring.evolve(cluster_secret=SECRET)
    async with Node(open_ring) as first:  # a node with a secret does not join a ring without one
        joiner = Node(signing, join=first.address)
        with pytest.raises(IncompatibleConfigError, match="secured"):
            await joiner.start()
        assert joiner.stopped
    async with Node(signing) as first:  # nor one without a secret a ring with one
        with pytest.raises(UnauthorizedError):
            await Node(open_ring, join=first.address).start()
    async with Node(open_ring) as first:  # a token alone signs RPCs too: no joining an open ring
        with pytest.raises(IncompatibleConfigError, match="secured"):
            await Node(open_ring.evolve(api_token="t"), join=first.address).start()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


async def test_tls_between_nodes(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    tls = Config(tls_cert=cert, tls_key=key, tls_ca=cert, load_entrypoints=False)

    async def echo(payload: Payload) -> Payload:
        return payload

    server = AiohttpTransport(tls)
    port = await server.serve("127.0.0.1", 0, {"echo": echo})
    try:
        async with AiohttpTransport(tls) as client:
            assert await client.call(f"127.0.0.1:{port}", "echo", {"over": "tls"}, 5.0) == {"over": "tls"}
        async with AiohttpTransport(Config()) as plain:
            with pytest.raises(PeerUnreachableError):
                await plain.call(f"127.0.0.1:{port}", "echo", {}, 2.0)
    finally:
        await server.aclose()


# -- mutual TLS ---------------------------------------------------------------------------------------


async def test_rpc_needs_a_client_certificate_with_mutual_tls(pki: Pki) -> None:
    seen: list[Payload] = []

    async def remember(payload: Payload) -> Payload:
        seen.append(payload)
        return {"count": len(seen)}

    tls = Config(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca, load_entrypoints=False)
    server, box = AiohttpTransport(tls), Box()
    port = await server.serve("127.0.0.1", 0, {"remember": remember}, api=box)
    address = f"127.0.0.1:{port}"
    try:
        anonymous = ssl.create_default_context(cafile=pki.ca)  # trusts the node, presents no certificate
        async with aiohttp.ClientSession() as http:
            async with http.post(f"https://{address}/rpc/remember", json={"n": 1}, ssl=anonymous) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["type"] == "UnauthorizedError"
            # the public API needs no certificate: the API token is its guard
            async with http.put(f"https://{address}/kv/k", data=b"v", ssl=anonymous) as resp:
                assert resp.status == 200
        async with AiohttpTransport(Config(tls_ca=pki.ca)) as certless:
            with pytest.raises(UnauthorizedError, match="client certificate"):
                await certless.call(address, "remember", {"n": 2}, 5.0)
        async with AiohttpTransport(tls) as member:
            assert await member.call(address, "remember", {"n": 3}, 5.0) == {"count": 1}
    finally:
        await server.aclose()
    assert seen == [{"n": 3}]
    assert box.data == {"k": b"v"}


async def test_a_node_with_an_untrusted_certificate_cannot_join(
    pki: Pki, certificate: tuple[str, str]
) -> None:
    solo = {"replicas": 1, "write_quorum": 1, "read_quorum": 1, "join_timeout": 0.0}
    tls = Config(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca, load_entrypoints=False, **solo)  # type: ignore[arg-type]
    async with Node(tls) as first:
        own_cert, own_key = certificate  # self-signed: it trusts the ring's CA, the ring does not trust it
        intruder = Node(tls.evolve(tls_cert=own_cert, tls_key=own_key), join=first.address)
        with pytest.raises((PeerUnreachableError, UnauthorizedError)):
            await intruder.start()
        assert intruder.stopped
        assert addresses(first.view().successors) == {first.address}
        assert addresses(filter(None, [first.view().predecessor])) <= {first.address}
        async with Node(tls, join=first.address) as friend:
            await friend.put("k", b"v")
            assert await first.get("k") == b"v"


# -- the API token alone, and nodes that are open -------------------------------------------------------


async def test_an_api_token_alone_closes_the_rpc_path() -> None:
    async def echo(payload: Payload) -> Payload:
        return payload

    server = AiohttpTransport(Config(api_token="t0ken"))
    port = await server.serve("127.0.0.1", 0, {"echo": echo})
    address = f"127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{address}/rpc/echo", json={}) as resp:
                assert resp.status == 401
            async with http.post(
                f"http://{address}/rpc/echo", json={}, headers={"Authorization": "Bearer t0ken"}
            ) as resp:
                assert resp.status == 401  # the token opens /kv, not the ring's RPCs
        async with AiohttpTransport(Config(api_token="t0ken")) as member:
            assert await member.call(address, "echo", {"a": 1}, 2.0) == {"a": 1}
        async with AiohttpTransport(Config(api_token="other")) as stranger:
            with pytest.raises(UnauthorizedError):
                await stranger.call(address, "echo", {}, 2.0)
    finally:
        await server.aclose()


def test_an_open_rpc_path_beyond_loopback_is_reported(pki: Pki) -> None:
    warning = rpc_exposure(Config(), "0.0.0.0")
    assert warning is not None
    assert "no cluster secret and no mutual TLS" in warning
    assert rpc_exposure(Config(), "") is not None
    assert rpc_exposure(Config(), "127.0.0.1") is None
    assert rpc_exposure(Config(), "::1") is None
    assert rpc_exposure(Config(cluster_secret=SECRET), "0.0.0.0") is None
    assert rpc_exposure(Config(api_token="t0ken"), "0.0.0.0") is None
    assert rpc_exposure(Config(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca), "0.0.0.0") is None
    assert rpc_exposure(Config(tls_cert=pki.cert, tls_key=pki.key), "0.0.0.0") is not None


# -- replays to another node, and after a restart ----------------------------------------------------------


async def test_a_signed_request_is_good_only_at_its_destination(
    server: tuple[AiohttpTransport, list[Payload], Box],
) -> None:
    first, seen, _ = server
    second = AiohttpTransport(Config(cluster_secret=SECRET))
    port = await second.serve("127.0.0.1", 0, {})
    meant_for: str = first.address  # type: ignore[attr-defined]
    body = orjson.dumps({"n": 1})
    captured = signed_headers(SECRET, "remember", meant_for, body)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{port}/rpc/remember", data=body, headers=captured
            ) as resp:
                assert resp.status == 401
                message = (await resp.json())["error"]["message"]
                assert repr(meant_for) in message
                assert repr(f"127.0.0.1:{port}") in message  # the name it expected
            async with http.post(f"http://{meant_for}/rpc/remember", data=body, headers=captured) as resp:
                assert resp.status == 200
    finally:
        await second.aclose()
    assert seen == [{"n": 1}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_restarted_node_refuses_what_it_accepted_before() -> None:
    seen: list[Payload] = []

    async def remember(payload: Payload) -> Payload:
        seen.append(payload)
        return {}

    port = free_port()
    address = f"127.0.0.1:{port}"
    config = Config(cluster_secret=SECRET)
    body = orjson.dumps({"n": 1})
    before = AiohttpTransport(config)
    await before.serve("127.0.0.1", port, {"remember": remember})
    captured = signed_headers(SECRET, "remember", address, body)
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(f"http://{address}/rpc/remember", data=body, headers=captured) as resp:
                assert resp.status == 200
        finally:
            await before.aclose()
        # timestamps have millisecond resolution: let the clock pass the captured one before restarting
        await asyncio.sleep(max(0.0, (int(captured[TIMESTAMP]) + 2) / 1000 - time.time()))
        after = AiohttpTransport(config)
        await after.serve("127.0.0.1", port, {"remember": remember})
        try:
            async with http.post(f"http://{address}/rpc/remember", data=body, headers=captured) as resp:
                assert resp.status == 401
                assert "before this node started" in (await resp.json())["error"]["message"]
            fresh = signed_headers(SECRET, "remember", address, body)
            async with http.post(f"http://{address}/rpc/remember", data=body, headers=fresh) as resp:
                assert resp.status == 200
        finally:
            await after.aclose()
    assert seen == [{"n": 1}, {"n": 1}]


def test_the_replay_guard_refuses_requests_signed_before_its_start() -> None:
    now = [1000.0]
    guard = ReplayGuard(SECRET, max_skew=30, clock=lambda: now[0], destinations=["n:1"])
    now[0] += 5
    with pytest.raises(UnauthorizedError, match="before this node started"):
        guard.check("m", signed_headers(SECRET, "m", "n:1", b"{}", now=999.5), b"{}")
    guard.check("m", signed_headers(SECRET, "m", "n:1", b"{}", now=1000.0), b"{}")
    with pytest.raises(UnauthorizedError, match="signed for 'n:2'"):
        guard.check("m", signed_headers(SECRET, "m", "n:2", b"{}", now=1001.0), b"{}")


# -- malformed authentication headers ------------------------------------------------------------------


async def test_non_ascii_signatures_and_tokens_get_401_json(
    server: tuple[AiohttpTransport, list[Payload], Box],
) -> None:
    transport, seen, box = server
    address: str = transport.address  # type: ignore[attr-defined]
    body = orjson.dumps({"n": 1})
    headers = {**signed_headers(SECRET, "remember", address, body), SIGNATURE: "é" * 64}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://{address}/rpc/remember", data=body, headers=headers) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "UnauthorizedError"
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /kv/k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n")
        head, _, rest = (await reader.read(65536)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 401")
    assert b"application/json" in head
    assert orjson.loads(rest)["error"]["type"] == "UnauthorizedError"
    assert seen == []
    assert box.data == {}


async def test_tls_handshakes_that_never_finish_are_capped_and_the_port_stays_open(pki: Pki) -> None:
    tls = Config(
        tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca, load_entrypoints=False, max_connections=64
    )
    server, box = AiohttpTransport(tls), Box()
    port = await server.serve("127.0.0.1", 0, {}, api=box)
    gate = server.gate
    assert gate is not None
    loop = asyncio.get_running_loop()
    stalled: list[socket.socket] = []
    try:
        for _ in range(300):  # connect, then never say a word of TLS
            sock = socket.socket()
            stalled.append(sock)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
        for _ in range(20):  # let the server accept what the backlog holds
            await asyncio.sleep(0)
        assert gate.open <= gate.cap
        assert gate.counts["evicted"] + gate.counts["refused"] > 0
        client = ssl.create_default_context(cafile=pki.ca)
        async with (  # an honest client still gets through
            aiohttp.ClientSession() as http,
            http.put(f"https://127.0.0.1:{port}/kv/k", data=b"v", ssl=client) as resp,
        ):
            assert resp.status == 200
        assert box.data == {"k": b"v"}
    finally:
        for sock in stalled:
            sock.close()
        await server.aclose()
