"""The gRPC transport's public port (balancer_grpc.port): the caps it fits to the open-file limit, and, in one
process on asyncio's loop, what it admits, times out, evicts and refuses (node processes run it on uvloop:
test_grpc_idle_connections.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import grpc
import pytest
from balancer_grpc import GrpcTransport
from balancer_grpc import port as port_module
from balancer_grpc.codec import encode, method_path
from balancer_grpc.port import OUTGOING, RELAY_DESCRIPTORS, GatedPort, fitted_caps
from processes import until

from balancer.config import Config
from balancer.hookspecs import Payload
from balancer.plugins.connections import ACCEPT_BACKLOG, ConnectionGate

QUICK: dict[str, Any] = {"load_entrypoints": False, "rpc_timeout": 2.0}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


async def echo(payload: Payload) -> Payload:
    return {"echo": payload}


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[GrpcTransport]:
    """A transport serving ``echo`` on 127.0.0.1 (its ``port`` is the public one)."""
    transport = GrpcTransport(config)
    await transport.serve("127.0.0.1", 0, {"echo": echo})
    try:
        yield transport
    finally:
        await transport.aclose()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (what it sent before is read)."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(1 << 16):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


def test_the_caps_share_the_open_file_limit() -> None:
    assert fitted_caps(1024, soft_limit=8192) == (1024, 1024)  # room for both: nothing lowered
    assert fitted_caps(1024, soft_limit=1024) == (386, 42)  # the figures the README gives
    for soft in range(256, 8193, 64):
        http, grpc_cap = fitted_caps(1024, soft_limit=soft)
        assert 16 <= grpc_cap <= 1024
        assert 16 <= http <= 1024
        if soft >= 2048:  # above the limits where fitted_cap falls back to half the descriptors
            spare = OUTGOING + 4 * ACCEPT_BACKLOG + 64
            assert http + RELAY_DESCRIPTORS * grpc_cap <= soft - spare, soft
    assert fitted_caps(16, soft_limit=1024) == (16, 16)


async def test_a_connection_that_makes_no_ring_rpc_in_time_is_closed() -> None:
    async with serving(Config(header_timeout=0.5, **QUICK)) as transport:
        assert transport.gated is not None
        silent = await asyncio.open_connection("127.0.0.1", transport.port)
        speaking = await asyncio.open_connection("127.0.0.1", transport.port)
        try:
            speaking[1].write(PREFACE)  # relayed to gRPC, which answers, but no call follows
            assert await closed_by_server(silent[0], 10)
            assert await closed_by_server(speaking[0], 10)
        finally:
            for _, writer in (silent, speaking):
                writer.close()
        assert transport.gated.gate.counts["header_timeout"] == 2
        await until(lambda: _none_open(transport), timeout=10, what="the gate forgetting both")


async def _none_open(transport: GrpcTransport) -> bool:
    return transport.gated is not None and transport.gated.gate.open == 0 and not transport.gated.by_port


async def test_a_ring_connection_outlasts_a_crowd_of_idle_ones() -> None:
    config = Config(max_connections=16, **QUICK)
    async with serving(config) as transport, _client(config) as client:
        gated = transport.gated
        assert gated is not None
        address = f"127.0.0.1:{transport.port}"
        assert await client.call(address, "echo", {"n": 1}, 5) == {"echo": {"n": 1}}
        assert gated.gate.ring == 1  # its authenticated call put it in the reserve
        (member,) = gated.relays
        crowd: list[socket.socket] = []
        try:
            for _ in range(40):
                sock = socket.create_connection(("127.0.0.1", transport.port), timeout=5)
                crowd.append(sock)
            await until(lambda: _evicted(transport, 40 - 15), timeout=10, what="the crowd evicted")
            assert gated.gate.open <= 16
            # the member's connection was never evicted: the same one answers
            assert await client.call(address, "echo", {"n": 2}, 5) == {"echo": {"n": 2}}
            assert member in gated.relays
            assert gated.gate.ring == 1
        finally:
            for sock in crowd:
                sock.close()


async def _evicted(transport: GrpcTransport, count: int) -> bool:
    return transport.gated is not None and transport.gated.gate.counts["evicted"] >= count


@asynccontextmanager
async def _client(config: Config) -> AsyncIterator[GrpcTransport]:
    client = GrpcTransport(config)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_call_past_the_gate_is_refused() -> None:
    async with serving(Config(**QUICK)) as transport:
        assert transport.gated is not None
        inner = f"127.0.0.1:{transport.gated.inner_port}"
        async with grpc.aio.insecure_channel(inner) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method_path("echo"))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(encode({}), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "the node's port only" in str(refused.value.details())


async def test_closing_drops_the_connections_and_frees_the_port() -> None:
    transport = GrpcTransport(Config(**QUICK))
    port = await transport.serve("127.0.0.1", 0, {"echo": echo})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await transport.aclose()
        assert await closed_by_server(reader, 5)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_caller_that_closes_without_reading_still_counts_until_its_sockets_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a plain server stands in for gRPC: it answers without end to whatever arrives, and the caller never
    # reads, so the relay always holds bytes it cannot send
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            await reader.read(1)
            for _ in range(1024):  # at most 1 GB: far more than any socket buffers
                writer.write(b"x" * (1 << 20))
                await writer.drain()

    monkeypatch.setattr(port_module, "LINGER", 3.0)
    inner = await asyncio.start_server(flood, "127.0.0.1", 0)
    gate = ConnectionGate(64, header_timeout=30.0)
    gated = GatedPort(gate, int(inner.sockets[0].getsockname()[1]))
    public = await gated.listen("127.0.0.1", 0)
    callers: list[socket.socket] = []
    try:
        for _ in range(5):
            caller = socket.socket()
            caller.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
            caller.connect(("127.0.0.1", public))
            caller.sendall(b"?")
            callers.append(caller)
        await until(lambda: _true(all(r.inner is not None for r in gated.relays) and gate.open == 5))
        for caller in callers:
            caller.shutdown(socket.SHUT_WR)  # a FIN: the relay closes gracefully, with megabytes unsent
        await until(lambda: _true(len(gated.relays) == 5 and all(r._closed for r in gated.relays)))
        assert gate.open == 5  # closing, not closed: their descriptors are still held, so still counted
        await until(lambda: _true(gate.open == 0 and not gated.relays), timeout=10)  # the linger ran out
    finally:
        for caller in callers:
            caller.close()
        await gated.aclose()
        inner.close()
        await inner.wait_closed()


async def _true(value: bool) -> bool:
    return value
