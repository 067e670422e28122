"""The gRPC transport in one process: calls and their errors, dead and slow peers, signatures, TLS, size
limits, the public HTTP API on its own port, and a ring of nodes on it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import balancer_grpc
import grpc
import pytest
from balancer_grpc import GrpcSettings, GrpcTransport
from balancer_grpc.codec import SIGNED, encode, method_path
from grpc_support import Pki, make_pki

from balancer.auth import signed_headers
from balancer.config import Config
from balancer.errors import (
    BadRequestError,
    ConfigError,
    KeyNotFoundError,
    PeerUnreachableError,
    RemoteError,
    TooLargeError,
    UnauthorizedError,
    UnknownMethodError,
)
from balancer.hookspecs import Handler, Payload
from balancer.node import Node
from balancer.plugin import Registry, installed_plugins, plugin_manager

QUICK = {"load_entrypoints": False, "stabilize_interval": 0.1, "rpc_timeout": 2.0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Two CAs and a certificate signed by each."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """The server side of the tests' calls: a few handlers, and what they saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.handlers: dict[str, Handler] = {
            "echo": self.echo,
            "missing": self.missing,
            "bad": self.bad,
            "boom": self.boom,
            "slow": self.slow,
        }

    async def echo(self, payload: Payload) -> Payload:
        return {"echo": payload}

    async def missing(self, payload: Payload) -> Payload:
        raise KeyNotFoundError("user:7")

    async def bad(self, payload: Payload) -> Payload:
        raise BadRequestError("a field is wrong")

    async def boom(self, payload: Payload) -> Payload:
        raise RuntimeError("a bug")

    async def slow(self, payload: Payload) -> Payload:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return {}


@asynccontextmanager
async def serving(config: Config, served: Served | None = None) -> AsyncIterator[str]:
    """A transport serving ``served``'s handlers on 127.0.0.1; yields its address."""
    transport = GrpcTransport(config)
    port = await transport.serve("127.0.0.1", 0, (served or Served()).handlers)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await transport.aclose()


@asynccontextmanager
async def caller(config: Config) -> AsyncIterator[GrpcTransport]:
    transport = GrpcTransport(config)
    try:
        yield transport
    finally:
        await transport.aclose()


def raw(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A method called with bytes and answering bytes, as they are on the wire."""
    return channel.unary_unary(path)


async def test_calls_and_their_errors_come_back_as_balancer_errors() -> None:
    config = Config(**QUICK)  # type: ignore[arg-type]
    async with serving(config) as address, caller(config) as client:
        nested = {"list": [1, "two", None, 3.5, True], "map": {"k": "v"}, "big": 2**63 - 1}
        assert await client.call(address, "echo", nested, 2) == {"echo": nested}
        with pytest.raises(KeyNotFoundError) as missing:
            await client.call(address, "missing", {}, 2)
        assert missing.value.key == "user:7"
        with pytest.raises(BadRequestError, match="a field is wrong"):
            await client.call(address, "bad", {}, 2)
        with pytest.raises(RemoteError) as boom:
            await client.call(address, "boom", {}, 2)
        assert boom.value.kind == "InternalError"
        assert boom.value.status == 500
        assert "RuntimeError: a bug" in boom.value.message
        with pytest.raises(UnknownMethodError, match=r"no\.such"):
            await client.call(address, "no.such", {}, 2)
        # the peer lives on, and its channel is reused
        assert await client.call(address, "echo", {"again": 1}, 2) == {"echo": {"again": 1}}
        assert len(client._peers) == 1


async def test_a_slow_peer_times_out_and_its_handler_is_cancelled() -> None:
    served = Served()
    config = Config(**QUICK)  # type: ignore[arg-type]
    async with serving(config, served) as address, caller(config) as client:
        with pytest.raises(PeerUnreachableError, match="timed out") as slow:
            await client.call(address, "slow", {}, 0.3)
        assert not slow.value.refused
        await asyncio.wait_for(served.cancelled.wait(), 10)
        assert await client.call(address, "echo", {}, 2) == {"echo": {}}


async def test_a_dead_peer_is_refused_and_a_new_one_on_its_port_is_reached_at_once() -> None:
    config = Config(**QUICK)  # type: ignore[arg-type]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    async with caller(config) as client:
        for _ in range(3):
            with pytest.raises(PeerUnreachableError) as dead:
                await client.call(address, "echo", {}, 2)
            assert dead.value.refused
            assert dead.value.address == address
        # the failed channel was dropped: the next call dials afresh, with no reconnection backoff to wait out
        assert address not in client._peers
        server = GrpcTransport(config)
        await server.serve("127.0.0.1", port, Served().handlers)
        try:
            assert await client.call(address, "echo", {"n": 1}, 5) == {"echo": {"n": 1}}
        finally:
            await server.aclose()
        # a peer that goes away: calls fail as unreachable, never hang
        with pytest.raises(PeerUnreachableError):
            await client.call(address, "echo", {}, 2)


async def test_a_taken_port_is_an_os_error() -> None:
    config = Config(**QUICK)  # type: ignore[arg-type]
    async with serving(config) as address:
        transport = GrpcTransport(config)
        with pytest.raises(OSError, match="cannot listen"):
            await transport.serve("127.0.0.1", int(address.rpartition(":")[2]), {})
        await transport.aclose()


async def test_signed_calls_are_checked_with_the_cluster_secret() -> None:
    secured = Config(cluster_secret="s3cret", **QUICK)  # type: ignore[arg-type]
    async with serving(secured) as address:
        async with caller(secured) as member:
            assert await member.call(address, "echo", {"x": 1}, 2) == {"echo": {"x": 1}}
        async with caller(Config(**QUICK)) as stranger:  # type: ignore[arg-type]
            with pytest.raises(UnauthorizedError, match="not signed"):
                await stranger.call(address, "echo", {}, 2)
        async with caller(Config(cluster_secret="guess", **QUICK)) as wrong:  # type: ignore[arg-type]
            with pytest.raises(UnauthorizedError, match="signature does not match"):
                await wrong.call(address, "echo", {}, 2)
        # a signature is good for its destination, method and body, once
        body = encode({"x": 1})
        metadata = tuple((k.lower(), v) for k, v in signed_headers("s3cret", "echo", address, body).items())
        assert {k for k, _ in metadata} == set(SIGNED)
        async with grpc.aio.insecure_channel(address) as channel:
            echo = raw(channel, method_path("echo"))
            assert await echo(body, metadata=metadata, timeout=2)
            with pytest.raises(grpc.aio.AioRpcError) as replayed:
                await echo(body, metadata=metadata, timeout=2)
            assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "replayed" in (replayed.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as moved:
                await raw(channel, method_path("missing"))(body, metadata=metadata, timeout=2)
            assert moved.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_malformed_and_oversize_requests_and_other_services() -> None:
    config = Config(max_value_bytes=1000, **QUICK)  # type: ignore[arg-type]
    async with serving(config) as address, caller(config) as client:
        with pytest.raises(TooLargeError):
            await client.call(address, "echo", {"value": "x" * 200_000}, 2)
        async with grpc.aio.insecure_channel(address) as channel:
            for body in (b"\xc1", encode([1, 2]), encode({1: "not a string key"})):
                with pytest.raises(grpc.aio.AioRpcError) as malformed:
                    await raw(channel, method_path("echo"))(body, timeout=2)
                assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (
                    dict(malformed.value.trailing_metadata() or ())["x-balancer-error"] == "BadRequestError"
                )
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await raw(channel, "/some.Other/Method")(b"", timeout=2)
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert await client.call(address, "echo", {"ok": True}, 2) == {"echo": {"ok": True}}


async def test_mutual_tls_lets_members_in_and_keeps_strangers_out(pki: Pki) -> None:
    tls = {"tls_ca": pki.ca, "tls_cert": pki.cert, "tls_key": pki.key, **QUICK}
    member = Config(**tls)  # type: ignore[arg-type]
    async with serving(member) as address:
        async with caller(member) as client:  # a certificate signed by the CA; no secret needed
            assert await client.call(address, "echo", {"tls": 1}, 5) == {"echo": {"tls": 1}}
        async with caller(Config(tls_ca=pki.ca, **QUICK)) as no_cert:  # type: ignore[arg-type]
            with pytest.raises(PeerUnreachableError):
                await no_cert.call(address, "echo", {}, 5)
        foreign = Config(tls_ca=pki.ca, tls_cert=pki.other_cert, tls_key=pki.other_key, **QUICK)  # type: ignore[arg-type]
        async with caller(foreign) as stranger:
            with pytest.raises(PeerUnreachableError):
                await stranger.call(address, "echo", {}, 5)
        async with caller(Config(**QUICK)) as plain:  # type: ignore[arg-type]
            with pytest.raises(PeerUnreachableError):
                await plain.call(address, "echo", {}, 5)
    # with a secret too, the certificate alone is enough, as on the HTTP path
    both = Config(cluster_secret="s3cret", **tls)  # type: ignore[arg-type]
    async with serving(both) as address, caller(member) as unsigned:
        assert await unsigned.call(address, "echo", {}, 5) == {"echo": {}}
    # a CA without a certificate to serve with is refused at once
    with pytest.raises(ConfigError, match="tls_ca needs tls_cert"):
        await GrpcTransport(Config(tls_ca=pki.ca, **QUICK)).serve("127.0.0.1", 0, {})  # type: ignore[arg-type]


def test_settings_are_checked() -> None:
    def settings(**given: object) -> GrpcSettings:
        return GrpcSettings.from_config(Config(port=9001, extra={"grpc": given}))

    assert settings() == GrpcSettings(0)
    assert settings(http_port="9101") == GrpcSettings(9101)
    assert settings(http_port=9101) == GrpcSettings(9101)
    assert settings(http_port="off") == GrpcSettings(None)
    for wrong in ("http", "-1", "65536", "9001", True, 3.5):
        with pytest.raises(ConfigError, match="http_port"):
            settings(http_port=wrong)
    with pytest.raises(ConfigError, match="unknown grpc settings"):
        settings(htp_port="9101")


def test_the_plugin_registers_the_transport_through_its_entry_point() -> None:
    assert installed_plugins()["grpc"] == "balancer-grpc"
    registry = Registry(plugin_manager(load_entrypoints=True))
    assert "grpc" in registry.transports.factories
    assert isinstance(registry.transport(Config(transport="grpc")), GrpcTransport)
    # the plugin module itself stays light: grpc is imported only by the transport
    assert set(balancer_grpc.__all__) >= {"GrpcTransport", "RoutingInterceptor", "BalancedChannel"}
    assert "balancer_grpc.transport" in sys.modules  # imported above, on first use


async def test_a_ring_of_nodes_on_grpc_with_mutual_tls_and_a_secret_serves_http_on_its_own_port(
    pki: Pki,
) -> None:
    pm = plugin_manager(load_entrypoints=False, plugins=[balancer_grpc])
    tls = {"tls_ca": pki.ca, "tls_cert": pki.cert, "tls_key": pki.key, "cluster_secret": "s3cret"}
    config = Config(transport="grpc", api_token="t0ken", **tls, **QUICK)  # type: ignore[arg-type]
    nodes: list[Node] = []
    try:
        for _ in range(3):
            join = nodes[0].address if nodes else None
            nodes.append(await Node(config, pm=pm, join=join).start())
        await nodes[1].put("city", b"Porto Alegre")
        assert await nodes[2].get("city") == b"Porto Alegre"

        transport = nodes[0].transport
        assert isinstance(transport, GrpcTransport)
        assert transport.port == int(nodes[0].address.rpartition(":")[2])
        assert transport.http_port not in (None, 0, transport.port)
        base = f"https://127.0.0.1:{transport.http_port}"

        context = ssl.create_default_context(cafile=pki.ca)
        headers = {"Authorization": "Bearer t0ken"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
            async with http.get(f"{base}/kv/city", headers=headers) as resp:
                assert resp.status == 200
                assert await resp.read() == b"Porto Alegre"
            async with http.get(f"{base}/kv/city") as resp:
                assert resp.status == 401
            async with http.get(f"{base}/status", headers=headers) as resp:
                assert (await resp.json())["address"] == nodes[0].address

        for node in reversed(nodes):
            await node.leave()
    finally:
        for node in nodes:
            await node.close()


async def test_the_http_api_can_be_turned_off() -> None:
    pm = plugin_manager(load_entrypoints=False, plugins=[balancer_grpc])
    solo = {"replicas": 1, "write_quorum": 1, "read_quorum": 1}
    config = Config(transport="grpc", extra={"grpc": {"http_port": "off"}}, **solo, **QUICK)  # type: ignore[arg-type]
    async with Node(config, pm=pm) as node:
        transport = node.transport
        assert isinstance(transport, GrpcTransport)
        assert transport.http is None
        assert transport.http_port is None
        await node.put("k", b"v")
        assert await node.get("k") == b"v"
