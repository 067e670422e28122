"""The router's own keep-alive client to its backends, against backends that speak HTTP/1.1 by hand on
127.0.0.1, so each test decides every byte an answer carries and when a connection closes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import bound_socket, until

from balancer import BoundedLoadBalancer
from balancer.middleware import HOPS_HEADER, RingRouter, setup_routing

# -- a backend written by hand ----------------------------------------------------------------------


@dataclass
class Seen:
    """One request a :class:`HandBackend` read: on which connection (counting from 0), which request
    of that connection it was (from 0), and what it carried."""

    connection: int
    nth: int
    method: str
    target: str
    headers: dict[str, str]
    """By lowercase name; a repeated header keeps its last value."""
    body: bytes


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[bool]]
"""Writes the answer to a request (or not); returns whether the connection stays open for another."""


@dataclass
class HandBackend:
    """A backend on 127.0.0.1 whose answers a test writes byte by byte with ``answer``."""

    answer: Answer
    address: str = ""
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    """Connections accepted so far."""
    open: int = 0
    """Connections open now."""
    most_open: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            for nth in range(1000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
                method, target, _ = request_line.split(" ")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.lower()] = value.strip()
                if headers.get("transfer-encoding") == "chunked":
                    body = await read_chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(number, nth, method, target, headers, body)
                self.seen.append(seen)
                try:
                    if not await self.answer(seen, writer):
                        return
                except ConnectionError:  # the front door closed the connection mid-answer
                    return
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked request body (without trailers)."""
    pieces = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        pieces.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readexactly(2)
    return b"".join(pieces)


@contextlib.asynccontextmanager
async def hand_backend(answer: Answer) -> AsyncIterator[HandBackend]:
    """A :class:`HandBackend` listening for the ``async with`` block."""
    backend = HandBackend(answer)
    server = await asyncio.start_server(backend.serve, "127.0.0.1", 0)
    backend.address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield backend
    finally:
        server.close()
        await server.wait_closed()


def sized(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    """An answer framed by Content-Length."""
    extra = "".join(f"{h}\r\n" for h in headers)
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    """An answer framed by chunked transfer coding, with one chunk extension and optional trailers."""
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"]
    for piece in pieces:
        out.append(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
    out.append(b"0\r\n" + trailer + b"\r\n")
    return b"".join(out)


async def refuse(request: web.Request) -> web.Response:
    """A front door serves nothing itself."""
    return web.Response(status=500)


@dataclass
class Front:
    """A front door forwarding every ``/items/{key}`` to one backend."""

    url: str
    router: RingRouter
    balancer: BoundedLoadBalancer


@contextlib.asynccontextmanager
async def front_over(
    lb: BoundedLoadBalancer, *, cancel: bool = False, **options: Any
) -> AsyncIterator[Front]:
    """A front door on 127.0.0.1 routing by ``lb`` (``cancel``: handlers are cancelled when their client
    goes away)."""
    app = web.Application()
    router = setup_routing(app, balancer=lb, **options)
    app.router.add_route("*", "/items/{key}", refuse)
    runner = web.AppRunner(app, handler_cancellation=cancel)
    await runner.setup()
    sock = bound_socket()
    await web.SockSite(runner, sock).start()
    try:
        yield Front(f"http://127.0.0.1:{sock.getsockname()[1]}/items/", router, lb)
    finally:
        await runner.cleanup()
        sock.close()


def front(backend: str, **options: Any) -> contextlib.AbstractAsyncContextManager[Front]:
    """A front door forwarding everything to ``backend``."""
    return front_over(BoundedLoadBalancer([backend]), **options)


@contextlib.asynccontextmanager
async def through(
    answer: Answer, **options: Any
) -> AsyncIterator[tuple[HandBackend, Front, aiohttp.ClientSession]]:
    """A :class:`HandBackend` answering with ``answer``, a front door to it and a client session."""
    async with (
        hand_backend(answer) as backend,
        front(backend.address, **options) as door,
        aiohttp.ClientSession() as http,
    ):
        yield backend, door, http


def idle(router: RingRouter) -> int:
    """Idle connections the router keeps."""
    assert router._pool is not None
    return router._pool.idle()


# -- keep-alive ------------------------------------------------------------------------------------


async def echo(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    writer.write(sized(seen.method.encode() + b" " + seen.body, "Content-Type: text/plain"))
    return True


async def test_connections_are_kept_alive_and_reused() -> None:
    async with through(echo) as (backend, door, http):
        for i in range(10):
            async with http.get(door.url + f"k{i}") as resp:
                assert resp.status == 200
                assert await resp.read() == b"GET "
            async with http.post(door.url + f"k{i}", data=b"x" * i) as resp:
                assert resp.status == 200
                assert await resp.read() == b"POST " + b"x" * i
        assert backend.connections == 1  # sequential requests share one upstream connection
        assert [s.nth for s in backend.seen] == list(range(20))
        assert idle(door.router) == 1
        assert door.balancer.total_load == 0


async def test_concurrent_requests_stay_within_the_connection_limit() -> None:
    gate = asyncio.Event()

    async def held(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await gate.wait()
        writer.write(sized(seen.target.encode()))
        return True

    async with through(held, connections=2) as (backend, door, http):

        async def get(key: str) -> bytes:
            async with http.get(door.url + key) as resp:
                assert resp.status == 200
                return await resp.read()

        tasks = [asyncio.ensure_future(get(f"c{i}")) for i in range(6)]
        await until(lambda: len(backend.seen) == 2, "two requests at the backend")
        gate.set()
        answers = await asyncio.gather(*tasks)
    assert answers == [f"/items/c{i}".encode() for i in range(6)]
    assert backend.most_open == 2


# -- closed connections ---------------------------------------------------------------------------


async def test_a_connection_the_backend_closed_while_idle_is_not_used() -> None:
    async def once(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(sized(b"ok"))
        return False  # answered with keep-alive framing, then closed

    async with through(once) as (backend, door, http):
        for _ in range(3):
            async with http.post(door.url + "k", data=b"body") as resp:
                assert resp.status == 200
                assert await resp.read() == b"ok"
            await until(lambda: idle(door.router) == 0 and backend.open == 0, "the close noticed")
        assert backend.connections == 3
        assert [s.body for s in backend.seen] == [b"body"] * 3


async def stale_answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
    """The first connection answers its first request, then closes on the second unanswered (as a
    backend whose idle timeout fires just as a request arrives); later connections answer everything."""
    if seen.connection == 0 and seen.nth == 1:
        return False
    writer.write(sized(f"{seen.method} {seen.connection}".encode()))
    return True


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_an_idempotent_request_on_a_stale_connection_is_sent_again_once(method: str) -> None:
    async with through(stale_answer) as (backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert await resp.read() == b"GET 0"
        async with http.request(method, door.url + "k") as resp:
            assert resp.status == 200
            assert await resp.read() == f"{method} 1".encode()  # sent again, on a new connection
        assert [(s.connection, s.method) for s in backend.seen] == [(0, "GET"), (0, method), (1, method)]
        assert door.balancer.total_load == 0


async def test_a_post_on_a_stale_connection_is_502_and_not_sent_twice() -> None:
    async with through(stale_answer) as (backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert await resp.read() == b"GET 0"
        async with http.post(door.url + "k", data=b"pay once") as resp:
            assert resp.status == 502
            error = (await resp.json())["error"]
        assert error["type"] == "BadGateway"
        assert backend.address in error["message"]
        assert [(s.connection, s.method) for s in backend.seen] == [(0, "GET"), (0, "POST")]
        assert door.balancer.total_load == 0


async def test_a_stale_connection_is_retried_only_once() -> None:
    async def never(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.connection == 0 and seen.nth == 0:
            writer.write(sized(b"first"))
            return True
        return False  # every later request: closed unanswered

    async with through(never) as (backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert await resp.read() == b"first"
        async with http.get(door.url + "k") as resp:
            assert resp.status == 502
        assert len(backend.seen) == 3  # the stale one, and one fresh attempt
        assert door.balancer.total_load == 0


# -- framing ----------------------------------------------------------------------------------------


async def test_chunked_answers_arrive_whole_and_keep_the_connection() -> None:
    pieces = [b"alpha", b"b" * 70_000, b"omega"]

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        trailer = b"X-Checksum: 1\r\n" if seen.nth else b""
        writer.write(chunked(pieces, trailer))
        return True

    async with through(answer) as (backend, door, http):
        for key in ("a", "b"):
            async with http.get(door.url + key) as resp:
                assert resp.status == 200
                assert await resp.read() == b"".join(pieces)
                assert "X-Checksum" not in resp.headers
                assert resp.headers["Content-Type"] == "application/octet-stream"
        assert backend.connections == 1


async def test_an_answer_until_close_arrives_whole() -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        return False

    async with through(answer) as (backend, door, http):
        for _ in range(2):
            async with http.get(door.url + "k") as resp:
                assert resp.status == 200
                assert await resp.read() == b"all of it"
        assert backend.connections == 2


async def test_a_body_shorter_than_its_content_length_is_502() -> None:
    async def short(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
        return False

    async with through(short) as (_backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "BadGateway"
        assert door.balancer.total_load == 0


async def test_a_body_longer_than_its_content_length_is_cut_and_the_connection_dropped() -> None:
    async def long(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(sized(b"12345")[:-5] + b"12345" + b"HTTP/1.1 200 OK\r\n")  # junk after the body
        return True

    async with through(long) as (backend, door, http):
        for _ in range(2):
            async with http.get(door.url + "k") as resp:
                assert resp.status == 200
                assert await resp.read() == b"12345"
        assert backend.connections == 2  # the junk could be taken for the next answer: never reused


@pytest.mark.parametrize(
    "broken",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 500_000,  # closed halfway
        chunked([b"x" * 100_000])[:-5] + b"zz\r\n",  # a chunk size that is not hex
        chunked([b"x" * 100])[:-5],  # closed before the last chunk
    ],
)
async def test_a_streamed_body_that_breaks_cuts_the_clients_answer(broken: bytes) -> None:
    async def cut(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(broken)
        return False

    async with through(cut) as (_backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert resp.status == 200  # the head went out before the body broke
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await until(lambda: door.balancer.total_load == 0, "the load released")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: b\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ],
)
async def test_a_malformed_answer_is_502(head: bytes) -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(head)
        return True

    async with through(answer) as (backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "BadGateway"
        assert "X-Injected" not in resp.headers
        assert door.balancer.total_load == 0
        await until(lambda: backend.open == 0, "the connection dropped")


async def test_interim_answers_are_skipped_and_bodiless_answers_keep_framing() -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.method == "HEAD":  # a length but no body
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        elif seen.target.endswith("/none"):
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + sized(b"after hints"))
        return True

    async with through(answer) as (backend, door, http):
        async with http.head(door.url + "k") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "1000"
        async with http.get(door.url + "none") as resp:
            assert resp.status == 204
        async with http.get(door.url + "k") as resp:
            assert resp.status == 200
            assert await resp.read() == b"after hints"
        assert backend.connections == 1


# -- headers ----------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_stripped_both_ways() -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        hop = ("Connection: X-Private", "X-Private: 1", "Keep-Alive: timeout=5")
        writer.write(sized(b"{}", *hop, "X-End: 1"))
        return True

    async with through(answer) as (backend, door, http):
        sent = {
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "1",
            "Keep-Alive": "timeout=9",
            "X-Forwarded-For": "10.0.0.9",
            HOPS_HEADER: "0",
            "X-End-To-End": "kept",
        }
        async with http.get(door.url + "k%2Fx?q=a%20b", headers=sent) as resp:
            assert resp.status == 200
            assert resp.headers["X-End"] == "1"
            assert "X-Private" not in resp.headers
            assert "Keep-Alive" not in resp.headers
        (seen,) = backend.seen
    assert seen.target == "/items/k%2Fx?q=a%20b"  # passed on as sent, still encoded
    assert "x-secret" not in seen.headers
    assert "keep-alive" not in seen.headers
    assert seen.headers["x-end-to-end"] == "kept"
    assert seen.headers["host"] == backend.address
    assert seen.headers["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
    assert seen.headers["x-forwarded-host"] == door.url.split("/")[2]
    assert seen.headers[HOPS_HEADER.lower()] == "1"


# -- time and cancellation --------------------------------------------------------------------------


async def test_a_backend_that_hangs_gives_504_and_its_connection_is_dropped() -> None:
    release = asyncio.Event()

    async def hang(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.connection == 0:
            await release.wait()
            return False
        writer.write(sized(b"fresh"))
        return True

    async with through(hang, timeout=0.3) as (backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert resp.status == 504
            assert (await resp.json())["error"]["type"] == "GatewayTimeout"
        assert door.balancer.total_load == 0
        async with http.get(door.url + "k") as resp:
            assert await resp.read() == b"fresh"  # the hung connection was not reused
        release.set()
        assert backend.connections == 2


async def test_a_client_that_goes_away_releases_the_load_and_the_connection() -> None:
    release = asyncio.Event()

    async def hang(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        return False

    async with through(hang, cancel=True) as (backend, door, http):
        task = asyncio.ensure_future(http.get(door.url + "k"))
        await until(lambda: len(backend.seen) == 1, "the request at the backend")
        assert door.balancer.total_load == 1
        task.cancel()  # the client closes its connection; the front's handler is cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(lambda: door.balancer.total_load == 0, "the load released")
        assert idle(door.router) == 0
        release.set()


# -- large bodies -----------------------------------------------------------------------------------


async def test_large_bodies_stream_both_ways() -> None:
    payload = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        if seen.method == "POST":
            writer.write(sized(hashlib.sha256(seen.body).hexdigest().encode()))
        else:
            writer.write(sized(payload))
        await writer.drain()
        return True

    async with through(answer) as (_backend, door, http):

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]

        async with http.post(door.url + "up", data=chunks()) as resp:  # aiohttp's client carries it
            assert resp.status == 200
            assert await resp.read() == hashlib.sha256(payload).hexdigest().encode()
        async with http.get(door.url + "down") as resp:  # the router's own, streamed back
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(payload))
            assert await resp.read() == payload
        assert door.balancer.total_load == 0


async def test_a_backend_url_with_a_path_goes_through_aiohttp() -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(sized(seen.target.encode()))
        return True

    async with through(answer, backend_url=lambda a: f"http://{a}/base") as (_backend, door, http):
        async with http.get(door.url + "k?x=1") as resp:
            assert resp.status == 200
            assert await resp.read() == b"/base/items/k?x=1"
        assert door.router._pool is not None
        assert door.router._pool.idle() == 0


async def test_a_slow_client_holds_the_backend_back_instead_of_filling_memory() -> None:
    size = 32 << 20  # more than the sockets on the way can buffer

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size >> 20):
            writer.write(b"z" * (1 << 20))
            await writer.drain()
        return True

    async with through(answer) as (backend, door, http):
        pool = door.router._pool
        assert pool is not None
        async with http.get(door.url + "big") as resp:
            assert resp.status == 200
            # nothing read yet: the front stops reading the backend, whose writes back up
            await until(lambda: any(c.buffer and c._paused for c in pool._busy), "the front pausing")
            # at most one read (256 KiB) beyond the mark where it stops
            assert max(len(c.buffer) for c in pool._busy) <= 2 * (1 << 18)
            received = 0
            async for piece in resp.content.iter_chunked(1 << 16):
                assert piece.count(b"z") == len(piece)
                received += len(piece)
        assert received == size
        assert backend.connections == 1


async def test_an_answer_that_stalls_mid_body_is_cut_at_the_deadline() -> None:
    release = asyncio.Event()

    async def stall(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await release.wait()
        return False

    async with through(stall, timeout=0.3) as (_backend, door, http):
        async with http.get(door.url + "k") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await until(lambda: door.balancer.total_load == 0, "the load released")
        release.set()


async def test_one_connection_shared_by_two_backends() -> None:
    async with hand_backend(echo) as one, hand_backend(echo) as two:
        lb = BoundedLoadBalancer([one.address, two.address])
        keys = {lb.peek(f"k{i}"): f"k{i}" for i in range(100)}
        async with (
            front_over(lb, connections=1) as door,
            aiohttp.ClientSession() as http,
        ):
            for _ in range(3):  # each request to the other backend closes the idle connection first
                for backend in (one, two):
                    async with http.get(door.url + keys[backend.address]) as resp:
                        assert await resp.read() == b"GET "
            await until(lambda: one.open + two.open <= 1, "at most one connection open")
        assert one.connections == two.connections == 3


@pytest.mark.parametrize("body", [b"", b"x" * (1 << 17)], ids=["own client", "aiohttp"])
async def test_both_clients_pass_on_the_same_headers(body: bytes) -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> bool:
        writer.write(sized(b"ok"))
        return True

    async with through(answer) as (backend, door, http):
        headers = {"User-Agent": "test-agent/1", "X-Custom": "kept"}
        async with http.post(
            door.url + "k", data=body, headers=headers, skip_auto_headers=["Accept"]
        ) as resp:
            assert resp.status == 200
        (seen,) = backend.seen
    assert seen.body == body
    assert seen.headers["user-agent"] == "test-agent/1"
    assert seen.headers["x-custom"] == "kept"
    assert "accept" not in seen.headers  # the client sent none, and none is added on the way
    assert seen.headers["x-balancer-hops"] == "1"
