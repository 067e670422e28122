"""The stream transport over real sockets on 127.0.0.1: pipelining, errors, authentication, hostile
bytes, idle connections, and living beside HTTP on one port."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from conftest import Pki
from helpers import until

from balancer import errors
from balancer.auth import sign
from balancer.config import Config
from balancer.errors import PeerUnreachableError, UnauthorizedError
from balancer.hookspecs import Handler, Payload
from balancer.plugins.aiohttp_transport import AiohttpTransport
from balancer.plugins.stream_transport import HEADER, MAGIC, StreamTransport, _keys

SECRET = "correct horse battery staple"

BOTH_LOOPS = True
"""Every test here runs on both event loops a node may run on (``--loop``; see conftest.py)."""

REQUEST, RESULT, ERROR, CANCEL, HELLO, WELCOME = range(6)

Serve = Callable[..., Awaitable[tuple[StreamTransport, str]]]


class Handlers:
    """RPC handlers that record what they saw: an echo, a slow call, failures of each kind."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.calls = 0

    async def echo(self, payload: Payload) -> Payload:
        self.calls += 1
        return {"echo": payload}

    async def wait(self, payload: Payload) -> Payload:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return {"waited": payload}

    async def missing(self, payload: Payload) -> Payload:
        raise errors.KeyNotFoundError(str(payload.get("key")))

    async def broken(self, payload: Payload) -> Payload:
        raise RuntimeError("a bug")

    def table(self) -> dict[str, Handler]:
        return {"echo": self.echo, "wait": self.wait, "missing": self.missing, "broken": self.broken}


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
async def serve(handlers: Handlers) -> AsyncIterator[Serve]:
    """Start stream transports serving ``handlers``; every one is closed at the end."""
    started: list[StreamTransport] = []

    async def start(config: Config | None = None) -> tuple[StreamTransport, str]:
        transport = StreamTransport(config or Config())
        started.append(transport)
        port = await transport.serve("127.0.0.1", 0, handlers.table())
        return transport, f"127.0.0.1:{port}"

    yield start
    for transport in started:
        await transport.aclose()


async def test_calls_share_one_connection_and_answer_out_of_order(serve: Serve, handlers: Handlers) -> None:
    server, address = await serve()
    async with StreamTransport() as client:
        slow = asyncio.create_task(client.call(address, "wait", {"n": 1}, 10.0))
        fast = [await client.call(address, "echo", {"n": i}, 10.0) for i in range(3)]
        assert fast == [{"echo": {"n": i}} for i in range(3)]  # answered while "wait" still runs
        assert not slow.done()
        handlers.release.set()
        assert await slow == {"waited": {"n": 1}}
        many = await asyncio.gather(*(client.call(address, "echo", {"i": i}, 10.0) for i in range(200)))
        assert many == [{"echo": {"i": i}} for i in range(200)]
        assert len(server.connections) == 1


async def test_errors_come_back_as_balancer_errors(serve: Serve) -> None:
    _, address = await serve()
    async with StreamTransport() as client:
        with pytest.raises(errors.KeyNotFoundError, match="k1"):
            await client.call(address, "missing", {"key": "k1"}, 5.0)
        with pytest.raises(errors.UnknownMethodError, match="nope"):
            await client.call(address, "nope", {}, 5.0)
        with pytest.raises(errors.RemoteError, match="RuntimeError: a bug") as raised:
            await client.call(address, "broken", {}, 5.0)
        assert raised.value.status == 500
        assert await client.call(address, "echo", {"still": "up"}, 5.0) == {"echo": {"still": "up"}}


async def test_a_timeout_cancels_the_handler_and_leaves_the_connection_working(
    serve: Serve, handlers: Handlers
) -> None:
    _, address = await serve()
    async with StreamTransport() as client:
        with pytest.raises(PeerUnreachableError, match="timed out") as raised:
            await client.call(address, "wait", {}, 0.2)
        assert not raised.value.refused
        await asyncio.wait_for(handlers.cancelled.wait(), 10.0)
        assert await client.call(address, "echo", {}, 5.0) == {"echo": {}}


async def test_unreachable_peers(serve: Serve) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with StreamTransport() as client:
        with pytest.raises(PeerUnreachableError) as raised:
            await client.call(f"127.0.0.1:{port}", "echo", {}, 5.0)
        assert raised.value.refused
        with pytest.raises(PeerUnreachableError, match="not a host:port"):
            await client.call("127.0.0.1", "echo", {}, 5.0)


async def test_a_peer_that_drops_mid_call_fails_the_call_and_the_next_call_reconnects(
    serve: Serve, handlers: Handlers
) -> None:
    server, address = await serve()
    async with StreamTransport() as client:
        waiting = asyncio.create_task(client.call(address, "wait", {}, 10.0))
        await until(lambda: any(c.busy for c in server.connections), "the call to arrive")
        for connection in list(server.connections):
            connection.close()
        # the server's end of the connection is gone: the call fails at once, not at its timeout
        with pytest.raises(PeerUnreachableError, match="connection") as raised:
            await asyncio.wait_for(waiting, 5.0)
        assert not raised.value.refused
        assert await client.call(address, "echo", {"again": 1}, 5.0) == {"echo": {"again": 1}}


async def test_signed_connections(serve: Serve) -> None:
    _, address = await serve(Config(cluster_secret=SECRET))
    async with StreamTransport(Config(cluster_secret=SECRET)) as member:
        assert await member.call(address, "echo", {"a": 1}, 5.0) == {"echo": {"a": 1}}
    async with StreamTransport(Config(cluster_secret="another secret")) as stranger:
        with pytest.raises(UnauthorizedError, match="signature"):
            await stranger.call(address, "echo", {}, 5.0)
    async with StreamTransport(Config()) as unsigned:
        with pytest.raises(UnauthorizedError, match="not signed"):
            await unsigned.call(address, "echo", {}, 5.0)


async def test_a_caller_with_the_secret_refuses_a_server_without_it(serve: Serve) -> None:
    _, address = await serve(Config())
    async with StreamTransport(Config(cluster_secret=SECRET)) as member:
        with pytest.raises(errors.IncompatibleConfigError, match="does not sign"):
            await member.call(address, "echo", {}, 5.0)


async def test_mutual_tls(serve: Serve, pki: Pki) -> None:
    tls = Config(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca)
    _, address = await serve(tls)
    async with StreamTransport(tls) as member:
        assert await member.call(address, "echo", {"over": "tls"}, 5.0) == {"echo": {"over": "tls"}}
    async with StreamTransport(Config(tls_ca=pki.ca)) as certless:
        with pytest.raises(UnauthorizedError, match="client certificate"):
            await certless.call(address, "echo", {}, 5.0)
    async with StreamTransport(Config()) as plain:
        with pytest.raises(PeerUnreachableError):
            await plain.call(address, "echo", {}, 2.0)


async def test_tls_and_a_secret_together(serve: Serve, pki: Pki) -> None:
    both = Config(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca, cluster_secret=SECRET)
    _, address = await serve(both)
    async with StreamTransport(both) as member:  # TLS protects the frames: no tags, on either side
        assert await member.call(address, "echo", {"n": 1}, 5.0) == {"echo": {"n": 1}}
        assert await member.call(address, "echo", {"n": 2}, 5.0) == {"echo": {"n": 2}}
    wrong = Config(tls_cert=pki.cert, tls_key=pki.key, tls_ca=pki.ca, cluster_secret="another secret")
    async with StreamTransport(wrong) as certified:  # a certificate the CA signed is enough, as over HTTP
        with pytest.raises(UnauthorizedError, match="did not prove"):
            await certified.call(address, "echo", {}, 5.0)


# -- hostile bytes, sent by hand ------------------------------------------------------------------------


class Raw:
    """A hand-driven client connection: write frames, read frames, see whether the server hung up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, address: str, hello: dict[str, str] | None = None) -> Raw:
        host, _, port = address.rpartition(":")
        raw = cls(*await asyncio.open_connection(host, int(port)))
        if hello is not None:
            raw.writer.write(MAGIC)
            raw.frame(0, HELLO, msgspec.msgpack.encode(hello))
            ident, kind, _ = await raw.read()
            assert (ident, kind) == (0, WELCOME)
        return raw

    def frame(self, ident: int, kind: int, body: bytes) -> None:
        self.writer.write(HEADER.pack(len(body), ident, kind) + body)

    async def read(self) -> tuple[int, int, object]:
        size, ident, kind = HEADER.unpack(await asyncio.wait_for(self.reader.readexactly(HEADER.size), 10))
        body = await asyncio.wait_for(self.reader.readexactly(size), 10)
        return ident, kind, msgspec.msgpack.decode(body)

    async def hung_up(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1 << 16), 10) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def keys(hello: dict[str, str], welcome: dict[str, str]) -> tuple[bytes, bytes]:
    """The session keys the transport derives (caller to server, server to caller)."""
    return _keys(SECRET, hello["nonce"], welcome["nonce"])


async def test_malformed_requests_get_errors_and_the_connection_lives_on(serve: Serve) -> None:
    _, address = await serve(Config(max_value_bytes=1000, max_key_bytes=100))
    raw = await Raw.open(address, {"nonce": "n1"})
    try:
        deep = b"\x92\xa4echo\x81\xa1a" + b"\x91" * 50_000 + b"\xc0"
        bad = {
            1: b"\xc1",  # never valid msgpack
            2: msgspec.msgpack.encode([1, {}]),  # the method is not a string
            3: msgspec.msgpack.encode(["echo", [1, 2]]),  # the payload is not a map
            4: msgspec.msgpack.encode(["echo", {"t": msgspec.msgpack.Ext(5, b"x")}]),  # an extension type
            5: deep,  # nested deeper than any decoder's stack
        }
        for ident, request in bad.items():
            raw.frame(ident, REQUEST, request)
        raw.frame(6, REQUEST, msgspec.msgpack.encode(["echo", {"v": "x" * 100_000}]))  # over the limit
        raw.frame(7, REQUEST, msgspec.msgpack.encode(["nope", {}]))
        raw.frame(8, REQUEST, msgspec.msgpack.encode(["echo", {"fine": True}]))
        answers: dict[int, tuple[int, Any]] = {}
        for _ in range(8):
            ident, kind, answer = await raw.read()
            answers[ident] = (kind, answer)
        for ident in bad:
            kind, answer = answers[ident]
            assert kind == ERROR
            assert answer[:2] == [400, "BadRequestError"], (ident, answer)
        assert answers[6][0] == ERROR
        assert answers[6][1][:2] == [413, "TooLargeError"]
        assert answers[7][1][:2] == [404, "UnknownMethodError"]
        assert answers[8] == (RESULT, {"echo": {"fine": True}})
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "opening",
    [
        pytest.param(b"\x00balancer-stream/9\r\n", id="another version"),
        pytest.param(MAGIC + HEADER.pack(2, 1, REQUEST) + b"\x92\xa0", id="a request before the hello"),
        pytest.param(MAGIC + HEADER.pack(1, 0, HELLO) + b"\xc1", id="a hello that is not msgpack"),
        pytest.param(MAGIC + HEADER.pack(1, 0, HELLO) + b"\x80", id="a hello without a nonce"),
        pytest.param(MAGIC + HEADER.pack(0, 0, 9), id="an unknown kind of frame"),
        pytest.param(MAGIC + HEADER.pack(1 << 30, 0, HELLO), id="a huge hello"),
    ],
)
async def test_a_broken_opening_closes_the_connection(serve: Serve, opening: bytes) -> None:
    server, address = await serve()
    raw = await Raw.open(address)
    try:
        raw.writer.write(opening)
        data = await asyncio.wait_for(raw.reader.read(), 10)  # all it says before it hangs up
        assert not data or data[HEADER.size - 1] == ERROR
    finally:
        await raw.close()
    await until(lambda: not server.connections, "the connection to close")
    async with StreamTransport() as client:  # and the node serves on
        assert await client.call(address, "echo", {}, 5.0) == {"echo": {}}


async def test_protocol_violations_after_the_hello_close_the_connection(
    serve: Serve, handlers: Handlers
) -> None:
    _, address = await serve()
    for violation in (
        lambda raw: raw.frame(3, RESULT, msgspec.msgpack.encode({})),  # only servers answer
        lambda raw: raw.frame(0, HELLO, msgspec.msgpack.encode({"nonce": "again"})),  # one hello only
        lambda raw: [raw.frame(9, REQUEST, msgspec.msgpack.encode(["wait", {}])) for _ in range(2)],
    ):
        raw = await Raw.open(address, {"nonce": "n"})
        try:
            violation(raw)
            assert await raw.hung_up()
        finally:
            await raw.close()


async def test_silent_connections_are_closed_after_the_header_timeout(serve: Serve) -> None:
    server, address = await serve(Config(header_timeout=0.3))
    raw = await Raw.open(address)
    try:
        raw.writer.write(MAGIC[:1])  # a NUL, then nothing: a stream connection that never says hello
        assert await raw.hung_up()
    finally:
        await raw.close()
    assert server.gate is not None
    assert server.gate.counts["header_timeout"] == 1


async def test_tags_refuse_forged_frames_and_hellos_cannot_be_replayed(serve: Serve) -> None:
    _, address = await serve(Config(cluster_secret=SECRET))
    stamp = str(int(time.time() * 1000))
    hello = {"nonce": "c0ffee", "to": address, "ts": stamp}
    hello["sig"] = sign(SECRET, "stream.hello", address, stamp, "c0ffee", b"")
    raw = await Raw.open(address)
    try:
        raw.writer.write(MAGIC)
        raw.frame(0, HELLO, msgspec.msgpack.encode(hello))
        ident, kind, welcome = await raw.read()
        assert (ident, kind) == (0, WELCOME)
        assert isinstance(welcome, dict)
        send, _ = keys(hello, welcome)

        def tagged(sequence: int, ident: int, body: bytes) -> bytes:
            header = HEADER.pack(len(body), ident, REQUEST)
            mac = hashlib.blake2b(sequence.to_bytes(8, "big"), key=send, digest_size=16)
            mac.update(header + body)
            return header + body + mac.digest()

        body = msgspec.msgpack.encode(["echo", {"n": 1}])
        raw.writer.write(tagged(0, 1, body))
        size, ident, kind = HEADER.unpack(await asyncio.wait_for(raw.reader.readexactly(HEADER.size), 10))
        assert (ident, kind) == (1, RESULT)
        await asyncio.wait_for(raw.reader.readexactly(size + 16), 10)  # the answer, and its tag
        raw.writer.write(tagged(0, 2, body))  # frame 0 again: a replay inside the connection
        assert await raw.hung_up()
    finally:
        await raw.close()
    # the same hello on a new connection is a replay
    again = await Raw.open(address)
    try:
        again.writer.write(MAGIC)
        again.frame(0, HELLO, msgspec.msgpack.encode(hello))
        ident, kind, error = await again.read()
        assert (ident, kind) == (0, ERROR)
        assert error == [401, "UnauthorizedError", "the request was replayed"]
    finally:
        await again.close()


# -- beside HTTP, and with HTTP-only peers -------------------------------------------------------------


async def test_http_and_streams_share_the_port_and_http_only_peers_are_called_over_http(
    serve: Serve, handlers: Handlers
) -> None:
    _, address = await serve()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://{address}/rpc/echo", json={"over": "http"}) as response,
    ):
        assert response.status == 200
        assert await response.json() == {"echo": {"over": "http"}}
    async with AiohttpTransport() as old:
        assert await old.call(address, "echo", {"from": "aiohttp"}, 5.0) == {"echo": {"from": "aiohttp"}}
    older = AiohttpTransport()
    port = await older.serve("127.0.0.1", 0, handlers.table())
    try:
        async with StreamTransport() as client:
            for _ in range(2):
                answer = await client.call(f"127.0.0.1:{port}", "echo", {"to": "aiohttp"}, 5.0)
                assert answer == {"echo": {"to": "aiohttp"}}
    finally:
        await older.aclose()


async def test_idle_connections_close_the_callers_end_first(serve: Serve) -> None:
    server, address = await serve(Config(idle_timeout=0.6))
    assert server.gate is not None
    async with StreamTransport(Config(idle_timeout=0.6)) as client:
        await client.call(address, "echo", {}, 5.0)
        assert server.gate.ring == 1  # an authenticated ring connection: never evicted for a public one
        await until(lambda: not server.connections, "the connection to close")
        assert await client.call(address, "echo", {"n": 2}, 5.0) == {"echo": {"n": 2}}
    raw = await Raw.open(address, {"nonce": "n"})  # a caller that never closes its end
    try:
        assert await raw.hung_up()
    finally:
        await raw.close()
