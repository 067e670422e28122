"""Signed RPCs, the API token and TLS, over real sockets on 127.0.0.1."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from balancer.auth import NONCE, SIGNATURE, TIMESTAMP, ReplayGuard, signed_headers
from balancer.config import Config
from balancer.errors import PeerUnreachableError, UnauthorizedError
from balancer.hookspecs import Payload, PublicApi
from balancer.node import Node
from balancer.plugins.aiohttp_transport import AiohttpTransport

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
    headers = signed_headers(SECRET, "remember", body)
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers) as resp:
            assert resp.status == 200
        async with http.post(url, data=body, headers=headers) as resp:  # the same request again
            assert resp.status == 401
            assert "replayed" in (await resp.json())["error"]["message"]
        old = signed_headers(SECRET, "remember", body, now=1_000_000_000)
        async with http.post(url, data=body, headers=old) as resp:
            assert resp.status == 401
            assert "timestamp" in (await resp.json())["error"]["message"]
        fresh = signed_headers(SECRET, "remember", body)
        async with http.post(url, data=orjson.dumps({"n": 666}), headers=fresh) as resp:
            assert resp.status == 401
        other = signed_headers(SECRET, "remember", body)
        async with http.post(url.replace("remember", "forget"), data=body, headers=other) as resp:
            assert resp.status == 401  # the signature covers the method
        async with http.post(url, data=body) as resp:
            assert resp.status == 401
        bad_json = b"{nope"
        async with http.post(
            url, data=bad_json, headers=signed_headers(SECRET, "remember", bad_json)
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
    now = [1000.0]
    guard = ReplayGuard(SECRET, max_skew=30, clock=lambda: now[0])
    headers = signed_headers(SECRET, "m", b"{}", now=now[0])
    guard.check("m", headers, b"{}")
    with pytest.raises(UnauthorizedError, match="replayed"):
        guard.check("m", headers, b"{}")
    late = signed_headers(SECRET, "m", b"{}", now=now[0] - 31)
    with pytest.raises(UnauthorizedError, match="off"):
        guard.check("m", late, b"{}")
    with pytest.raises(UnauthorizedError, match="not signed"):
        guard.check("m", {TIMESTAMP: "1", NONCE: "x"}, b"{}")
    with pytest.raises(UnauthorizedError, match="does not match"):
        guard.check("m", {TIMESTAMP: "1", NONCE: "x", SIGNATURE: "00"}, b"{}")


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
