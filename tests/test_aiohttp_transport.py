"""Tests for balancer.plugins.aiohttp_transport: RPCs and the public API over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import yarl

from balancer import errors
from balancer.config import Config
from balancer.errors import (
    BadRequestError,
    BalancerError,
    KeyNotFoundError,
    PeerUnreachableError,
    RemoteError,
    UnknownMethodError,
)
from balancer.hookspecs import Handler, Payload, PublicApi, Transport, TransportFactory
from balancer.plugins.aiohttp_transport import AiohttpTransport, balancer_register_transports, status_for

HOST = "127.0.0.1"
CONFIG = Config(max_key_bytes=64, max_value_bytes=1000, rpc_timeout=0.5)


class DictApi(PublicApi):
    """A public API over a dict, so the HTTP layer can be tested without a ring."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes:
        try:
            return self.data[key]
        except KeyError:
            raise KeyNotFoundError(key) from None

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    async def delete(self, key: str) -> None:
        if self.data.pop(key, None) is None:
            raise KeyNotFoundError(key)

    async def status(self) -> Payload:
        return {"keys": len(self.data)}


def raising(exc: BaseException) -> Handler:
    """A handler that raises ``exc``."""

    async def handler(payload: Payload) -> Payload:
        raise exc

    return handler


async def echo(payload: Payload) -> Payload:
    return {"echo": payload}


async def not_an_object(payload: Payload) -> Payload:
    return cast(Payload, [1, 2])


@dataclass
class Node:
    """A serving transport, its address and the state its handlers touch."""

    transport: AiohttpTransport
    address: str
    api: DictApi
    waiting: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def kv(self, key: str) -> yarl.URL:
        """The URL of ``key``, every reserved character percent-encoded."""
        return yarl.URL(f"{self.url}/kv/{quote(key, safe='')}", encoded=True)


async def start(config: Config = CONFIG, *, public: bool = True) -> Node:
    """A transport serving the test handlers (and a :class:`DictApi`) on a free port."""
    transport = AiohttpTransport(config)
    node = Node(transport, "", DictApi())

    async def hang(payload: Payload) -> Payload:
        node.waiting.set()
        try:
            await asyncio.Event().wait()  # never set: only the caller giving up ends this
        except asyncio.CancelledError:
            node.cancelled.set()
            raise
        return {}

    handlers: dict[str, Handler] = {
        "echo": echo,
        "hang": hang,
        "missing": raising(KeyNotFoundError("some/key")),
        "bad": raising(BadRequestError("no good")),
        "boom": raising(RuntimeError("kaboom")),
        "not_an_object": not_an_object,
    }
    try:
        port = await transport.serve(HOST, 0, handlers, node.api if public else None)
    except BaseException:
        await transport.aclose()
        raise
    node.address = f"{HOST}:{port}"
    return node


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    served = await start()
    try:
        yield served
    finally:
        await served.transport.aclose()


@pytest.fixture
async def client() -> AsyncIterator[AiohttpTransport]:
    async with AiohttpTransport(CONFIG) as transport:
        yield transport


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The ``error`` object of a JSON error answer."""
    assert response.content_type == "application/json"
    body = orjson.loads(await response.read())
    assert set(body) == {"error"}
    return cast(dict[str, Any], body["error"])


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# -- RPCs ---------------------------------------------------------------------------------------------


async def test_round_trip_between_two_transports() -> None:
    a, b = await start(), await start()
    try:
        payload = {"n": 1, "s": "é/ü", "list": [1, None, True], "nested": {"x": 1.5}}
        assert await a.transport.call(b.address, "echo", payload, 1.0) == {"echo": payload}
        assert await b.transport.call(a.address, "echo", {}, 1.0) == {"echo": {}}
        # the shared session keeps the connection alive for the next call
        assert await a.transport.call(b.address, "echo", {"again": 2}, 1.0) == {"echo": {"again": 2}}
    finally:
        await a.transport.aclose()
        await b.transport.aclose()


async def test_handler_errors_arrive_as_the_same_class(node: Node, client: AiohttpTransport) -> None:
    with pytest.raises(KeyNotFoundError) as missing:
        await client.call(node.address, "missing", {}, 1.0)
    assert missing.value.key == "some/key"
    with pytest.raises(BadRequestError, match="no good"):
        await client.call(node.address, "bad", {}, 1.0)


async def test_unknown_method(node: Node, client: AiohttpTransport) -> None:
    with pytest.raises(UnknownMethodError, match="nope"):
        await client.call(node.address, "nope", {}, 1.0)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (errors.RingError("left"), errors.RingError),
        (errors.IncompatibleConfigError("bits differ"), errors.IncompatibleConfigError),
        (errors.TooLargeError("too big"), errors.TooLargeError),
        (errors.ConfigError("bad setting"), errors.ConfigError),
    ],
)
async def test_rebuildable_errors(exc: BalancerError, expected: type[BalancerError]) -> None:
    async with AiohttpTransport(CONFIG) as server, AiohttpTransport(CONFIG) as client:
        port = await server.serve(HOST, 0, {"fail": raising(exc)})
        with pytest.raises(expected) as raised:
            await client.call(f"{HOST}:{port}", "fail", {}, 1.0)
        assert type(raised.value) is expected
        assert str(raised.value) == str(exc)


async def test_other_errors_arrive_as_remote_error(client: AiohttpTransport) -> None:
    handlers = {
        "nodes": raising(errors.NoNodesError("empty ring")),
        "peer": raising(PeerUnreachableError("10.0.0.9:1", "timed out")),
    }
    async with AiohttpTransport(CONFIG) as server:
        address = f"{HOST}:{await server.serve(HOST, 0, handlers)}"
        with pytest.raises(RemoteError) as nodes:
            await client.call(address, "nodes", {}, 1.0)
        assert (nodes.value.kind, nodes.value.message, nodes.value.status) == (
            "NoNodesError",
            "empty ring",
            500,
        )
        # the peer answered, so its own unreachable peer is its error, not ours
        with pytest.raises(RemoteError) as peer:
            await client.call(address, "peer", {}, 1.0)
        assert (peer.value.kind, peer.value.status) == ("PeerUnreachableError", 503)


async def test_answer_that_is_not_an_object(node: Node, client: AiohttpTransport) -> None:
    with pytest.raises(RemoteError):
        await client.call(node.address, "not_an_object", {}, 1.0)


async def test_internal_error_is_500_and_the_server_keeps_serving(
    node: Node, client: AiohttpTransport, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="balancer.plugins.aiohttp_transport"):
        async with http.post(f"{node.url}/rpc/boom", data=b"{}") as response:
            assert response.status == 500
            error = await error_of(response)
    assert error["type"] == "InternalError"
    assert "kaboom" in error["message"]
    assert "Traceback" not in error["message"]
    assert any(record.exc_info for record in caplog.records)
    with pytest.raises(RemoteError) as raised:
        await client.call(node.address, "boom", {}, 1.0)
    assert (raised.value.kind, raised.value.status) == ("InternalError", 500)
    assert await client.call(node.address, "echo", {"ok": 1}, 1.0) == {"echo": {"ok": 1}}


async def test_unused_port_is_unreachable_quickly(client: AiohttpTransport) -> None:
    address = f"{HOST}:{free_port()}"
    started = time.monotonic()
    with pytest.raises(PeerUnreachableError) as raised:
        await client.call(address, "echo", {}, 5.0)
    assert raised.value.address == address
    assert time.monotonic() - started < 2.0


async def test_slow_handler_times_out(node: Node, client: AiohttpTransport) -> None:
    started = time.monotonic()
    with pytest.raises(PeerUnreachableError, match="timed out"):
        await client.call(node.address, "hang", {}, 0.2)
    assert time.monotonic() - started < 2.0
    assert node.waiting.is_set()
    # the caller hung up, so the server cancels the handler rather than leaving it behind
    await asyncio.wait_for(node.cancelled.wait(), 5.0)
    assert await client.call(node.address, "echo", {}, 1.0) == {"echo": {}}


async def test_close_cancels_handlers_in_progress(client: AiohttpTransport) -> None:
    served = await start()
    try:
        call = asyncio.create_task(client.call(served.address, "hang", {}, 5.0))
        await asyncio.wait_for(served.waiting.wait(), 5.0)
    finally:
        await served.transport.aclose()  # waits about CONFIG.rpc_timeout, then cancels
    assert served.cancelled.is_set()
    with pytest.raises(PeerUnreachableError):
        await call


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b""])
async def test_malformed_body_is_400(
    node: Node, client: AiohttpTransport, http: aiohttp.ClientSession, body: bytes
) -> None:
    async with http.post(f"{node.url}/rpc/echo", data=body) as response:
        assert response.status == 400
        assert (await error_of(response))["type"] == "BadRequestError"
    assert await client.call(node.address, "echo", {"after": True}, 1.0) == {"echo": {"after": True}}


async def test_wrong_http_method_is_json(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{node.url}/rpc/echo") as response:
        assert response.status == 405
        assert (await error_of(response))["type"] == "HTTPMethodNotAllowed"


async def test_rpc_body_over_the_limit_is_413(node: Node, client: AiohttpTransport) -> None:
    with pytest.raises(errors.TooLargeError, match="limit"):
        await client.call(node.address, "echo", {"blob": "x" * 200_000}, 2.0)
    assert await client.call(node.address, "echo", {}, 1.0) == {"echo": {}}


async def test_close_is_idempotent_and_final() -> None:
    served = await start()
    await served.transport.aclose()
    await served.transport.aclose()
    with pytest.raises(PeerUnreachableError, match="closed"):
        await served.transport.call(served.address, "echo", {}, 1.0)


# -- the public API -------------------------------------------------------------------------------------


async def test_put_get_delete_status(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.put(node.kv("k1"), data=b"\x00value\xff") as response:
        assert response.status == 200
        assert orjson.loads(await response.read()) == {"stored": "k1"}
    async with http.get(node.kv("k1")) as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        assert await response.read() == b"\x00value\xff"
    async with http.get(f"{node.url}/status") as response:
        assert response.status == 200
        assert orjson.loads(await response.read()) == {"keys": 1}
    async with http.delete(node.kv("k1")) as response:
        assert response.status == 200
        assert orjson.loads(await response.read()) == {"deleted": "k1"}
    assert node.api.data == {}


async def test_missing_key_is_404(node: Node, http: aiohttp.ClientSession) -> None:
    for request in (http.get, http.delete):
        async with request(node.kv("absent")) as response:
            assert response.status == 404
            error = await error_of(response)
        assert error == {"type": "KeyNotFoundError", "message": "not found: absent"}


async def test_empty_value_is_a_value(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.put(node.kv("empty"), data=b"") as response:
        assert response.status == 200
    assert node.api.data == {"empty": b""}


async def test_oversize_value_is_413_and_not_stored(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.put(node.kv("big"), data=b"x" * 1001) as response:
        assert response.status == 413
        error = await error_of(response)
    assert error["type"] == "TooLargeError"
    assert "1001" in error["message"]
    assert "1000" in error["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the size shows only on reading
        for _ in range(3):
            yield b"y" * 400

    async with http.put(node.kv("big"), data=chunks()) as response:
        assert response.status == 413
        assert (await error_of(response))["type"] == "TooLargeError"
    assert node.api.data == {}
    async with http.put(node.kv("fits"), data=b"z" * 1000) as response:
        assert response.status == 200
    assert node.api.data == {"fits": b"z" * 1000}


async def test_oversize_key_is_413(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.put(node.kv("é" * 33), data=b"v") as response:  # 33 characters, 66 UTF-8 bytes
        assert response.status == 413
        assert (await error_of(response))["type"] == "TooLargeError"
    async with http.put(node.kv("k" * 64), data=b"v") as response:
        assert response.status == 200
    assert list(node.api.data) == ["k" * 64]


async def test_empty_key_is_400(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.put(f"{node.url}/kv/", data=b"v") as response:
        assert response.status == 400
        assert (await error_of(response))["type"] == "BadRequestError"
    assert node.api.data == {}


@pytest.mark.parametrize("key", ["a/b c", "/lead/ing/", "sp ace", "100%?#&=+é"])
async def test_keys_with_reserved_characters_round_trip(
    node: Node, http: aiohttp.ClientSession, key: str
) -> None:
    async with http.put(node.kv(key), data=b"v") as response:
        assert response.status == 200
        assert orjson.loads(await response.read()) == {"stored": key}
    assert node.api.data == {key: b"v"}
    async with http.get(node.kv(key)) as response:
        assert await response.read() == b"v"


async def test_unescaped_slashes_and_spaces_in_a_key(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.put(f"{node.url}/kv/dir/sub dir/file name", data=b"v") as response:
        assert response.status == 200
    assert node.api.data == {"dir/sub dir/file name": b"v"}


async def test_no_public_api_without_api(http: aiohttp.ClientSession) -> None:
    served = await start(public=False)
    try:
        async with http.get(served.kv("k")) as response:
            assert response.status == 404
            assert (await error_of(response))["type"] == "HTTPNotFound"
    finally:
        await served.transport.aclose()


# -- the status table and the plugin hook ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.BadRequestError("x"), 400),
        (errors.ConfigError("x"), 400),
        (errors.KeyNotFoundError("x"), 404),
        (errors.UnknownMethodError("x"), 404),
        (errors.TooLargeError("x"), 413),
        (errors.IncompatibleConfigError("x"), 409),
        (errors.PeerUnreachableError("x"), 503),
        (errors.RingError("x"), 503),
        (errors.CapacityError("x"), 500),
        (RuntimeError("x"), 500),
    ],
)
def test_status_for(exc: BaseException, status: int) -> None:
    assert status_for(exc) == status


def test_registers_aiohttp() -> None:
    registered: dict[str, TransportFactory] = {}
    balancer_register_transports(registered.__setitem__)
    transport: Transport = registered["aiohttp"](CONFIG)
    assert isinstance(transport, AiohttpTransport)
    assert transport.config is CONFIG


# -- malformed requests and the connection gate --------------------------------------------------------------


async def raw(address: str, request: bytes, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """Send ``request`` bytes on a new connection; the answer's head and body (the server closes it)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(timeout):
            answer = await reader.read()  # until EOF: a malformed request closes the connection
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /kv/" + b"k" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a 10 KB URL
        b"GET /status HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
        b"GET /status HTTP/1.1\r\nX-Flood: " + b"v" * 20_000 + b"\r\n\r\n",  # one huge header
        b"GET /status HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n",
    ],
    ids=["long-url", "many-headers", "huge-header", "malformed-header", "not-http"],
)
async def test_protocol_errors_answer_in_json_with_one_log_line(
    node: Node, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head, body = await raw(node.address, request_bytes)
    assert head.split(b"\r\n")[0].split()[1] == b"400", head
    assert b"Content-Type: application/json" in head
    error = orjson.loads(body)["error"]
    assert error["type"] == "BadRequestError"
    assert error["message"]
    assert not [r for r in caplog.records if r.exc_info], "a malformed request logged a traceback"
    assert len([r for r in caplog.records if r.levelno >= logging.INFO and r.name != "aiohttp.access"]) <= 1
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/status") as response:
        assert response.status == 200  # and the node keeps serving


async def test_a_key_at_the_limit_reaches_the_handler_when_percent_encoded(
    http: aiohttp.ClientSession,
) -> None:
    served = await start(Config(max_key_bytes=4096, rpc_timeout=0.5))
    try:
        async with http.put(served.kv("é" * 2048), data=b"v") as response:  # 4096 bytes, 12 KB encoded
            assert response.status == 200
        async with http.put(served.kv("é" * 2049), data=b"v") as response:
            assert response.status == 413
            assert (await error_of(response))["type"] == "TooLargeError"
    finally:
        await served.transport.aclose()
    assert list(served.api.data) == ["é" * 2048]


async def test_a_connection_that_sends_no_complete_head_is_closed() -> None:
    served = await start(Config(header_timeout=0.2, idle_timeout=60))
    try:
        host, port = served.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # slowloris: the head never ends
        async with asyncio.timeout(30):
            assert await reader.read() == b""  # closed by the server, without an answer
        writer.close()
        assert served.transport.gate is not None
        assert served.transport.gate.counts["header_timeout"] == 1
    finally:
        await served.transport.aclose()


async def test_idle_public_connections_make_room_and_ring_connections_stay(
    client: AiohttpTransport, http: aiohttp.ClientSession
) -> None:
    served = await start(Config(max_connections=16, rpc_timeout=0.5))
    gate = served.transport.gate
    assert gate is not None
    assert (gate.cap, gate.reserve) == (16, 8)
    idle: list[socket.socket] = []
    try:
        assert await client.call(served.address, "echo", {}, 5.0) == {"echo": {}}
        assert gate.ring == 1
        host, port = served.address.rsplit(":", 1)
        for _ in range(40):
            sock = socket.create_connection((host, int(port)))
            idle.append(sock)
        await _until(lambda: gate.counts["evicted"] >= 40 - (gate.cap - gate.reserve))
        assert gate.open <= gate.cap
        async with http.get(f"{served.url}/status") as response:
            assert response.status == 200
        assert gate.ring == 1  # the ring connection was never the one evicted
        assert await client.call(served.address, "echo", {"again": 1}, 5.0) == {"echo": {"again": 1}}
    finally:
        for sock in idle:
            sock.close()
        await served.transport.aclose()


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)
