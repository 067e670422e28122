"""The ``stream`` transport: ring RPCs over one persistent, pipelined connection per pair of nodes.

The public API stays HTTP (it is the ``aiohttp`` transport's, on the same port); only calls between
nodes change. A caller opens one TCP connection (TLS with ``tls_ca``) to each peer it calls and keeps it;
every call on it is a frame with a call id, so any number of calls share the connection, answers come
back in whatever order the handlers finish, and a slow call holds up no other. Frames written in one
event-loop turn leave in one system call.

The connection opens with :data:`MAGIC`, whose first byte (NUL) can never start an HTTP request: that
is how the server, listening on one port, tells a ring connection from a client's HTTP request. Then:

- ``HELLO`` (caller): with a key to sign with, the same signed fields as an HTTP RPC (destination,
  timestamp, nonce, HMAC-SHA256; see :mod:`balancer.auth`), so the same replay rules hold;
- ``WELCOME`` (server): its own nonce, and with a key, a proof that it holds the key too.

Over plain TCP with a key, each direction then derives its own session key from the secret and both
nonces, and every frame carries a keyed BLAKE2b tag over its sequence number, header and body: a frame
cannot be forged, replayed, reordered or moved to another connection. Over TLS the tags are left out (TLS
already protects the bytes); a caller that presented a certificate signed by ``tls_ca`` needs no signed
hello, as on the HTTP path.

A frame is a 9-byte header (body length, call id, kind), the body (msgpack), and the tag when there is
one. A request's body is ``[method, payload]``; a result's is the payload; an error's is
``[status, type, message]`` with the HTTP path's statuses, rebuilt into the same balancer errors on the
caller's side. A caller whose call times out, or is cancelled, sends ``CANCEL`` and the handler is
cancelled, as an HTTP handler is when its caller hangs up. A request over the size limit is skipped
unread and answered with :class:`~balancer.errors.TooLargeError`; the connection lives on.

A peer that does not speak the stream protocol (a node on the ``aiohttp`` transport) answers the magic
with an HTTP error; the caller then calls that address over HTTP from then on, so a ring can move from one
transport to the other one node at a time. A node on this transport also serves ``POST /rpc/`` for such
callers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import secrets
import struct
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec

from balancer import errors
from balancer.auth import DESTINATION, NONCE, SIGNATURE, TIMESTAMP, ReplayGuard, sign
from balancer.config import Config
from balancer.errors import BalancerError, PeerUnreachableError, TooLargeError, UnauthorizedError
from balancer.hookspecs import Handler, Payload, Transport, TransportFactory, hookimpl
from balancer.plugins.aiohttp_transport import AiohttpTransport, status_for
from balancer.plugins.connections import ConnectionGate

__all__ = ["MAGIC", "StreamTransport"]

log = logging.getLogger(__name__)

MAGIC = b"\x00balancer-stream/1\r\n"
"""What a caller sends first; the NUL tells the server's port this is not HTTP, the rest the version."""

HEADER = struct.Struct("!IIB")
"""A frame's header: body length, call id, kind."""

REQUEST, RESULT, ERROR, CANCEL, HELLO, WELCOME = range(6)

TAG = 16
"""Bytes of the tag that authenticates each frame on a plain connection with a key."""

ANSWER_LIMIT = 1 << 28
"""Largest answer body a caller accepts (256 MiB): an answer that big is a broken or hostile peer."""

MAX_IN_FLIGHT = 256
"""Requests one connection may have running on the server; past it, the server stops reading it."""

_HELLO_FIELD = 256  # longest signed field in a hello, in characters


def _no_extensions(code: int, data: memoryview) -> Any:
    raise msgspec.DecodeError(f"msgpack extension type {code} is not part of the protocol")


# Decoders typed with the shape of each frame: msgspec checks the shape as it decodes, and no
# extension type (timestamps, say) ever reaches a handler, so a payload holds what JSON could.
_encode = msgspec.msgpack.Encoder().encode
_requests = msgspec.msgpack.Decoder(tuple[str, dict[str, Any]], ext_hook=_no_extensions).decode
_results = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_no_extensions).decode
_errors = msgspec.msgpack.Decoder(tuple[int, str, str]).decode
_greetings = msgspec.msgpack.Decoder(dict[str, str]).decode


class _Refused(Exception):
    """The protocol was broken by the other side; the connection is closed with this reason logged."""


def _keys(secret: str, client: str, server: str) -> tuple[bytes, bytes]:
    """The two session keys (caller to server, server to caller) of one connection."""
    base = f"{client}\n{server}\n".encode()
    key = secret.encode("utf-8", "surrogatepass")
    return (
        hmac.digest(key, b"balancer stream c2s\n" + base, "sha256"),
        hmac.digest(key, b"balancer stream s2c\n" + base, "sha256"),
    )


def _proof(secret: str, client: str, server: str) -> str:
    key = secret.encode("utf-8", "surrogatepass")
    return hmac.new(key, f"balancer stream welcome\n{client}\n{server}".encode(), hashlib.sha256).hexdigest()


class _Framing(asyncio.Protocol):
    """What both ends of a stream connection share: frame parsing, tags, coalesced writes, flow control.

    :param limit: largest body accepted; a larger one is skipped and :meth:`oversize` is told.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversize body (and its tag) still to throw away
        self._out: list[bytes] = []
        self._flushing = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._sent = 0
        self._received = 0
        self.last = 0.0
        """Event-loop time of the last frame in or out."""

    def start(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's: same shape, no subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"
        self.last = asyncio.get_running_loop().time()

    def authenticate(self, send: bytes, receive: bytes) -> None:
        """Tag every frame from now on: ``send`` for frames out, ``receive`` for frames in."""
        self._send_key, self._recv_key = send, receive

    def send(self, ident: int, kind: int, body: bytes = b"") -> None:
        """Queue one frame; the frames of one loop turn are written together."""
        header = HEADER.pack(len(body), ident, kind)
        self._out.append(header)
        self._out.append(body)
        if self._send_key is not None:
            self._out.append(self._tag(self._send_key, self._sent, header, body))
            self._sent += 1
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))
            self.last = asyncio.get_running_loop().time()

    @staticmethod
    def _tag(key: bytes, sequence: int, header: bytes, body: bytes) -> bytes:
        mac = hashlib.blake2b(sequence.to_bytes(8, "big"), key=key, digest_size=TAG)
        mac.update(header)
        mac.update(body)
        return mac.digest()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        try:
            self._parse(buffer)
        except _Refused as exc:
            log.info("closing the stream connection with %s: %s", self.peer, exc)
            self.close()

    def _parse(self, buffer: bytearray) -> None:
        at, end = 0, len(buffer)
        while True:
            tagged = self._recv_key is not None  # a hello may switch tags on mid-buffer
            extra = TAG if tagged else 0
            if self._skip:
                taken = min(self._skip, end - at)
                at += taken
                self._skip -= taken
                if self._skip:
                    break
                continue
            if end - at < HEADER.size:
                break
            size, ident, kind = HEADER.unpack_from(buffer, at)
            if size > self.limit:
                if tagged:  # an unchecked header could be forged: refuse rather than skip on its word
                    raise _Refused(f"a frame of {size} bytes is over the limit of {self.limit}")
                at += HEADER.size
                self._skip = size
                self.oversize(ident, kind, size)
                continue
            total = HEADER.size + size + extra
            if end - at < total:
                break
            header = bytes(buffer[at : at + HEADER.size])
            body = bytes(buffer[at + HEADER.size : at + HEADER.size + size])
            if tagged:
                tag = buffer[at + total - TAG : at + total]
                expected = self._tag(self._recv_key, self._received, header, body)  # type: ignore[arg-type]
                if not hmac.compare_digest(expected, tag):
                    raise _Refused("a frame's tag does not match: forged, replayed or damaged")
                self._received += 1
            at += total
            self.frame(ident, kind, body)
            if self.transport is None or self.transport.is_closing():
                break
        del buffer[:at]
        self.last = asyncio.get_running_loop().time()

    def frame(self, ident: int, kind: int, body: bytes) -> None:
        """Handle one whole frame (its tag checked)."""
        raise NotImplementedError

    def oversize(self, ident: int, kind: int, size: int) -> None:
        """A frame over the limit is being skipped."""
        raise _Refused(f"a frame of {size} bytes is over the limit of {self.limit}")

    def close(self) -> None:
        """Close the connection now."""
        if self.transport is not None:
            self.transport.abort()


def _error_body(exc: BaseException) -> bytes:
    if isinstance(exc, BalancerError):
        return _encode([status_for(exc), type(exc).__name__, str(exc)])
    return _encode([500, "InternalError", f"{type(exc).__name__}: {exc}"])


class _ServerConnection(_Framing):
    """The server's end of one stream connection: checks the hello, then runs requests concurrently."""

    def __init__(self, transport: StreamTransport, gate: ConnectionGate, deadline: float) -> None:
        super().__init__(transport.body_limit)
        self.owner = transport
        self.gate = gate
        self.busy = 0
        self._opened = False  # the magic has arrived
        self._welcomed = False
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._paused = False
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_at(deadline, self._late)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.start(transport)
        if not self.gate.admit(self):
            self.close()
            return
        self.owner.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gate.release(self)
        self.owner.connections.discard(self)
        self._stop_timer()
        for task in self._tasks.values():
            task.cancel()
        self.transport = None

    def force_close(self) -> None:
        """Drop the connection (the gate evicts it)."""
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if not self._welcomed:
            self.gate.note("header_timeout")
            self.close()
            return
        # an established connection: close it once idle for the idle timeout, with nothing running
        loop = asyncio.get_running_loop()
        idle = self.owner.config.idle_timeout
        if self._tasks or loop.time() - self.last < idle:
            self._timer = loop.call_at(max(self.last + idle, loop.time() + 1.0), self._late)
        else:
            self.close()

    def data_received(self, data: bytes) -> None:
        if not self._opened:
            self._buffer += data
            if len(self._buffer) < len(MAGIC):
                if not MAGIC.startswith(bytes(self._buffer)):
                    self._refuse_version()
                return
            if not self._buffer.startswith(MAGIC):
                self._refuse_version()
                return
            self._opened = True
            data = bytes(self._buffer[len(MAGIC) :])
            self._buffer.clear()
        super().data_received(data)

    def _refuse_version(self) -> None:
        log.info("refused a stream connection from %s: not protocol version 1", self.peer)
        self.send(0, ERROR, _encode([400, "BadRequestError", "this node speaks balancer-stream/1"]))
        self._flush()
        self.close()

    def frame(self, ident: int, kind: int, body: bytes) -> None:
        if kind == REQUEST and self._welcomed:
            self._request(ident, body)
        elif kind == CANCEL:
            if (task := self._tasks.get(ident)) is not None:
                task.cancel()
        elif kind == HELLO and not self._welcomed:
            self._hello(body)
        else:
            raise _Refused(f"unexpected frame of kind {kind}")

    def oversize(self, ident: int, kind: int, size: int) -> None:
        if kind != REQUEST or not self._welcomed:
            raise _Refused(f"a frame of {size} bytes is over the limit of {self.limit}")
        error = TooLargeError(f"request body is over the limit of {self.limit} bytes")
        self.send(ident, ERROR, _error_body(error))

    def _hello(self, body: bytes) -> None:
        owner = self.owner
        try:
            hello = _greetings(body)
            client = hello.get("nonce", "")
            if not (isinstance(client, str) and 0 < len(client) <= _HELLO_FIELD):
                raise _Refused("the hello has no nonce")
            self._admit(hello)
        except UnauthorizedError as exc:
            log.info("refused a stream connection from %s: %s", self.peer, exc)
            self.send(0, ERROR, _error_body(exc))
            self._flush()
            self.close()
            return
        except msgspec.DecodeError as exc:
            raise _Refused(f"the hello is not a map of strings: {exc}") from None
        server = secrets.token_hex(16)
        secret = owner.secret
        tls = self.transport is not None and self.transport.get_extra_info("sslcontext") is not None
        welcome = {"nonce": server}
        if secret is not None:
            welcome["proof"] = _proof(secret, client, server)
        self.send(0, WELCOME, _encode(welcome))
        self._flush()
        if secret is not None and not tls:
            receive, send = _keys(secret, client, server)
            self.authenticate(send, receive)
        self._welcomed = True
        self.gate.promote(self)
        self._stop_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + owner.config.idle_timeout, self._late)

    def _admit(self, hello: dict[str, str]) -> None:
        """Raise :class:`UnauthorizedError` unless the caller may make ring RPCs (the HTTP path's rules)."""
        guard, mutual = self.owner.guard, self.owner.mutual
        if mutual and self.transport is not None and self.transport.get_extra_info("peercert"):
            return
        if guard is not None:
            fields = {name: hello.get(key, "") for name, key in _SIGNED.items()}
            if any(len(value) > _HELLO_FIELD for value in fields.values()):
                raise UnauthorizedError("the hello's signed fields are too long")
            guard.check("stream.hello", fields, b"")
            return
        if mutual:
            raise UnauthorizedError("ring RPCs need a client certificate signed by the cluster's CA")

    def _request(self, ident: int, body: bytes) -> None:
        try:
            method, payload = _requests(body)
        except (msgspec.DecodeError, RecursionError) as exc:  # nesting deeper than the C stack allows
            self.send(ident, ERROR, _error_body(errors.BadRequestError(f"a request is [method, map]: {exc}")))
            return
        handler = self.owner.handlers.get(method)
        if handler is None:
            self.send(ident, ERROR, _error_body(errors.UnknownMethodError(f"unknown method {method!r}")))
            return
        if ident in self._tasks:
            raise _Refused(f"call id {ident} is already in use")
        task = asyncio.get_running_loop().create_task(self._run(ident, method, handler, payload))
        self._tasks[ident] = task
        self.busy += 1
        if len(self._tasks) >= MAX_IN_FLIGHT and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    async def _run(self, ident: int, method: str, handler: Handler, payload: Payload) -> None:
        try:
            result = await handler(payload)
            body = _encode(result)
            kind = RESULT
        except asyncio.CancelledError:
            return
        except BalancerError as exc:
            body, kind = _error_body(exc), ERROR
        except Exception as exc:
            log.exception("internal error answering %s over a stream connection", method)
            body, kind = _error_body(exc), ERROR
        finally:
            self._tasks.pop(ident, None)
            self.busy -= 1
            self._read_on()
        self.send(ident, kind, body)

    def pause_writing(self) -> None:
        # the caller reads no answers: take no more of its requests until it does
        super().pause_writing()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._read_on()

    def _read_on(self) -> None:
        """Read requests again, unless too many are running or answers cannot be written."""
        if self.transport is None or not self._writable.is_set():
            return
        if self._paused and len(self._tasks) >= MAX_IN_FLIGHT // 2:
            return
        self._paused = False
        self.transport.resume_reading()

    async def drain(self, grace: float) -> None:
        """Stop reading; let running requests finish within ``grace`` seconds, cancel the rest; close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
        if self.transport is not None:
            self._flush()
            self.transport.close()


_SIGNED = {DESTINATION: "to", TIMESTAMP: "ts", NONCE: "nonce", SIGNATURE: "sig"}


class _ClientConnection(_Framing):
    """The caller's end of one stream connection to one peer."""

    def __init__(self, address: str, owner: StreamTransport) -> None:
        super().__init__(ANSWER_LIMIT)
        self.address = address
        self.owner = owner
        self.calls: dict[int, asyncio.Future[Payload]] = {}
        self.welcome: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.closed: BaseException | None = None
        self._ids = itertools.count(1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.start(transport)
        assert self.transport is not None
        self.transport.write(MAGIC)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        reason = f"connection lost: {exc}" if exc else "connection closed by the peer"
        self.fail(PeerUnreachableError(self.address, reason))

    def fail(self, error: BaseException) -> None:
        """Fail every call waiting on this connection with ``error``; no call is made on it again."""
        if self.closed is None:
            self.closed = error
        self.owner.forget(self)
        if not self.welcome.done():
            self.welcome.set_exception(error)
            self.welcome.exception()  # retrieved here: the opener may have given up already
        calls, self.calls = self.calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if not self.welcome.done() and not self._buffer and data[:4] == b"HTTP":
            self.welcome.set_exception(_HttpOnly())
            self.close()
            return
        super().data_received(data)

    def frame(self, ident: int, kind: int, body: bytes) -> None:
        if kind in (RESULT, ERROR):
            future = self.calls.pop(ident, None)
            if ident == 0 and kind == ERROR and not self.welcome.done():
                self.welcome.set_exception(self._error(body))
                return
            if future is None or future.done():
                return  # the call timed out or was cancelled; its late answer is dropped
            if kind == ERROR:
                future.set_exception(self._error(body))
                return
            try:
                future.set_result(_results(body))
            except (msgspec.DecodeError, RecursionError):
                future.set_exception(errors.BadAnswerError(200, f"is not a msgpack map ({len(body)} bytes)"))
        elif kind == WELCOME and not self.welcome.done():
            try:
                self.welcome.set_result(_greetings(body))
            except msgspec.DecodeError:
                raise _Refused("the welcome is not a map of strings") from None
        else:
            raise _Refused(f"unexpected frame of kind {kind}")

    def _error(self, body: bytes) -> BalancerError:
        try:
            status, kind, message = _errors(body)
        except msgspec.DecodeError:
            return errors.BadAnswerError(
                500, f"is an error that is not [status, type, message] ({len(body)} B)"
            )
        return errors.rebuild(kind, message, status)

    async def open(self) -> None:
        """Say hello and wait for the welcome; raises what refused the connection."""
        secret = self.owner.secret
        client = secrets.token_hex(16)
        hello: dict[str, str] = {"nonce": client}
        if secret is not None:
            timestamp = str(int(time.time() * 1000))
            hello |= {
                "to": self.address,
                "ts": timestamp,
                "sig": sign(secret, "stream.hello", self.address, timestamp, client, b""),
            }
        self.send(0, HELLO, _encode(hello))
        welcome = await self.welcome
        server = welcome.get("nonce", "")
        if not 0 < len(server) <= _HELLO_FIELD:
            raise errors.BadAnswerError(200, "is a welcome without a nonce")
        if secret is None:
            return
        proof = welcome.get("proof", "")
        if not proof:
            raise errors.IncompatibleConfigError(
                f"{self.address} does not sign ring RPCs (secured=0, here 1): a node with a cluster secret "
                "or API token talks only to nodes with one"
            )
        if not (proof.isascii() and hmac.compare_digest(proof, _proof(secret, client, server))):
            raise UnauthorizedError(f"{self.address} did not prove that it holds the cluster secret")
        if self.transport is not None and self.transport.get_extra_info("sslcontext") is None:
            self.authenticate(*_keys(secret, client, server))

    async def call(self, method: str, payload: Payload, timeout: float) -> Payload:
        """One call on this connection; raises :class:`PeerUnreachableError` on a timeout."""
        if self.closed is not None:
            raise self.closed
        ident = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        future: asyncio.Future[Payload] = asyncio.get_running_loop().create_future()
        self.calls[ident] = future
        if not self._writable.is_set():
            await self._writable.wait()
        self.send(ident, REQUEST, _encode([method, payload]))
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise PeerUnreachableError(self.address, "timed out") from None
        finally:
            if self.calls.pop(ident, None) is not None and self.closed is None:
                self.send(ident, CANCEL)  # a timeout or a cancellation: the handler there need not run on


class _HttpOnly(Exception):
    """The peer answered the magic with HTTP: it does not serve the stream protocol."""


class StreamTransport(AiohttpTransport):
    """Ring RPCs over persistent pipelined connections; the public API and ``/rpc/`` over HTTP.

    :param config: as for :class:`~balancer.plugins.aiohttp_transport.AiohttpTransport`; ``idle_timeout``
        also closes stream connections with nothing to do (the caller's end after half of it, so the caller
        never writes to a connection the server is closing).
    """

    def __init__(self, config: Config | None = None, *, connection_limit: int = 100) -> None:
        super().__init__(config, connection_limit=connection_limit)
        self.connections: set[_ServerConnection] = set()
        """The server's open stream connections."""
        self._peers: dict[str, _ClientConnection] = {}
        self._opening: dict[str, asyncio.Future[_ClientConnection]] = {}
        self._http_only: set[str] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def secret(self) -> str | None:
        """The key ring RPCs are signed with, if any."""
        return self._secret

    @property
    def guard(self) -> ReplayGuard | None:
        """The server's replay guard, once serving with a key."""
        return self._guard

    @property
    def mutual(self) -> bool:
        """Whether callers may authenticate with a certificate signed by ``tls_ca``."""
        return bool(self.config.tls_ca and self.config.tls_cert)

    def _binary(self) -> Callable[[float], asyncio.Protocol] | None:
        gate = self.gate
        assert gate is not None

        def connection(deadline: float) -> asyncio.Protocol:
            return _ServerConnection(self, gate, deadline)

        return connection

    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """Call ``method`` at ``address`` over its stream connection (opened on first use, within
        ``timeout``); over HTTP if the peer does not speak the stream protocol.

        Raises :class:`PeerUnreachableError` on a timeout, a refused connection or one lost mid-call; an
        error answer is raised as its balancer class where it can be rebuilt, else as ``RemoteError``.
        """
        if self._closed:
            raise PeerUnreachableError(address, "this transport is closed")
        connection = self._peers.get(address)
        if connection is None:
            if address in self._http_only:
                return await super().call(address, method, payload, timeout)
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                connection = await self._connect(address, timeout)
            except _HttpOnly:
                self._http_only.add(address)
                log.debug("%s does not speak the stream protocol: calling it over HTTP", address)
                return await super().call(address, method, payload, timeout)
            timeout = max(0.0, timeout - (loop.time() - started))
        return await connection.call(method, payload, timeout)

    async def _connect(self, address: str, timeout: float) -> _ClientConnection:
        opening = self._opening.get(address)
        if opening is None:
            opening = asyncio.ensure_future(self._open(address, timeout))
            self._opening[address] = opening
            opening.add_done_callback(lambda _: self._opening.pop(address, None))
        return await asyncio.shield(opening)

    async def _open(self, address: str, timeout: float) -> _ClientConnection:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _ClientConnection(address, self),
                    host.strip("[]"),
                    int(port),
                    ssl=self._client_ssl,
                )
                try:
                    await connection.open()
                except BaseException:
                    connection.close()
                    raise
        except TimeoutError:
            raise PeerUnreachableError(address, "timed out") from None
        except BalancerError:  # refused by the peer (some balancer errors are OSErrors too)
            raise
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            raise PeerUnreachableError(address, str(exc) or type(exc).__name__, refused=refused) from exc
        except ValueError as exc:  # no port in the address
            raise PeerUnreachableError(address, f"not a host:port address ({exc})") from exc
        if self._closed:
            connection.close()
            raise PeerUnreachableError(address, "this transport is closed")
        self._peers[address] = connection
        self._sweep_soon()
        return connection

    def forget(self, connection: _ClientConnection) -> None:
        """Stop using a connection that failed or closed."""
        if self._peers.get(connection.address) is connection:
            del self._peers[connection.address]

    def _sweep_soon(self) -> None:
        if self._sweeper is None:
            # every quarter of the idle timeout: a connection idle for half of it is closed by three
            # quarters at the latest, well before the server's timer (a sweep every half could come just
            # short of a connection's half, and close it only together with the server)
            every = self.config.idle_timeout / 4
            self._sweeper = asyncio.get_running_loop().call_later(every, self._sweep)

    def _sweep(self) -> None:
        """Close the caller's connections idle for half the idle timeout, before the server would."""
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for connection in list(self._peers.values()):
            if not connection.calls and now - connection.last >= self.config.idle_timeout / 2:
                self.forget(connection)
                connection.close()
        if self._peers:
            self._sweep_soon()

    async def aclose(self) -> None:
        """Stop serving (running requests get ``rpc_timeout`` to finish) and close every connection."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for opening in list(self._opening.values()):
            opening.cancel()
        for connection in list(self._peers.values()):
            connection.fail(PeerUnreachableError(connection.address, "this transport is closed"))
            connection.close()
        self._peers.clear()
        try:
            await asyncio.gather(*(c.drain(self.config.rpc_timeout) for c in list(self.connections)))
        finally:
            await super().aclose()


@hookimpl(trylast=True)
def balancer_register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    """Register ``stream``."""

    def make(config: Config) -> Transport:
        return StreamTransport(config)

    register("stream", make)
