"""What the aiohttp server holds for its clients: a bounded number of connections, each for a bounded time.

A node serves its ring peers and the public on one port, so a crowd of connections that send nothing
could use up its file descriptors and cut it off from its own ring. :class:`ConnectionGate` prevents that:

- a **cap** on open connections, lowered to fit the process's open-file limit (``RLIMIT_NOFILE``) with
  room left for outgoing connections, storage files and one burst of accepts;
- a **reserve** of that cap for ring connections (those that made an authenticated ``/rpc/`` request):
  public and not yet classified connections may hold at most ``cap - reserve``;
- when a limit is reached, the oldest idle non-ring connection is closed to make room, else the new
  connection is closed at once;
- a **header timeout**: a new connection must send a complete request head within ``header_timeout``
  seconds (slowloris); keep-alive connections idle longer than ``idle_timeout`` are closed by aiohttp;
- refusals, evictions, timeouts and failed ``accept()`` calls are **counted and logged once per interval**,
  never once per event, so an attack cannot also flood the log.

:class:`GatedHandler` is aiohttp's per-connection protocol with these rules, and with protocol-level errors
(a request line or header over the limits, a malformed request) answered in the JSON error shape with one
log line instead of text and a traceback. :class:`GatedSite` listens with it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol, cast

import orjson
from aiohttp import web

__all__ = [
    "ACCEPT_BACKLOG",
    "ConnectionGate",
    "Gated",
    "GatedHandler",
    "GatedSite",
    "fitted_cap",
]

log = logging.getLogger(__name__)

ACCEPT_BACKLOG = 128
"""Listen backlog; asyncio also accepts up to this many connections in one go before any is admitted."""

_SPARE_FDS = 64  # stdio, the listening and event-loop descriptors, storage files, logs
_ACCEPT_ERROR = "socket.accept() out of system resource"


def fitted_cap(requested: int, *, outgoing: int, soft_limit: int | None = None) -> int:
    """The connection cap to serve with: ``requested``, lowered to fit the open-file limit.

    Room is left for ``outgoing`` client connections, twice the accept backlog (a burst accepted before
    any connection is admitted, and the closes of a burst refused) and a few spare descriptors.
    ``soft_limit`` is ``RLIMIT_NOFILE``'s soft limit, read from the process when not given (``None`` where
    the platform has none, or it is unlimited).
    """
    if soft_limit is None:
        soft_limit = _soft_nofile()
    if soft_limit is None:
        return requested
    room = soft_limit - outgoing - 2 * ACCEPT_BACKLOG - _SPARE_FDS
    # a limit too small for all that still serves, with half the descriptors
    return max(1, min(requested, max(room, soft_limit // 2)))


def _soft_nofile() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


class Gated(Protocol):
    """What the gate needs of a connection: whether it is handling anything, and a way to drop it."""

    busy: int
    """Requests in progress on the connection; a connection with none is idle, and may be evicted."""

    def force_close(self) -> None:
        """Close the connection now, whatever it was doing."""


class ConnectionGate:
    """Admits, classifies and evicts the server's connections; see the module documentation.

    :param cap: most connections open at once.
    :param header_timeout: seconds a new connection has to send its first complete request head.
    :param reserve: connections only ring connections may use (``max(8, cap // 8)`` by default, at most
        half the cap).
    :param interval: seconds between two log lines about refused or evicted connections.
    """

    def __init__(
        self, cap: int, *, header_timeout: float, reserve: int | None = None, interval: float = 10.0
    ) -> None:
        self.cap = cap
        self.reserve = min(cap // 2, max(8, cap // 8) if reserve is None else reserve)
        self.header_timeout = header_timeout
        self.interval = interval
        self.counts: Counter[str] = Counter()
        """Events since the gate was made, by kind: refused, evicted, header_timeout, accept_failed."""
        # insertion order is age: the first idle one is the oldest
        self._public: dict[Gated, None] = {}
        self._ring: set[Gated] = set()
        # TLS connections accepted whose handshake has not finished (they hold descriptors too), oldest first
        self._handshaking: dict[asyncio.Transport, None] = {}
        self._pending: Counter[str] = Counter()
        self._flush: asyncio.TimerHandle | None = None
        self._quiet_until = 0.0

    @property
    def open(self) -> int:
        """Connections open now (TLS handshakes in progress included)."""
        return len(self._public) + len(self._ring) + len(self._handshaking)

    @property
    def ring(self) -> int:
        """Open connections that made a ring RPC."""
        return len(self._ring)

    def admit(self, conn: Gated) -> bool:
        """Count a new connection in; False if it must be closed at once (no idle one could make room)."""
        self._public[conn] = None
        if self._room():
            return True
        if self._evict(spare=conn):
            return True
        del self._public[conn]
        self.note("refused")
        return False

    def begin_handshake(self, transport: asyncio.Transport) -> bool:
        """Count in a TLS connection just accepted, before its handshake; False if it must be closed.

        When full, the oldest idle public connection makes room, else the oldest handshake still going
        (an honest one takes milliseconds; a crowd of stalled ones must not lock the port).
        """
        self._handshaking[transport] = None
        if self._room() or self._evict():
            return True
        oldest = next((t for t in self._handshaking if t is not transport), None)
        if oldest is not None:
            del self._handshaking[oldest]
            oldest.abort()
            self.note("evicted")
            return True
        del self._handshaking[transport]
        self.note("refused")
        return False

    def end_handshake(self, transport: asyncio.Transport) -> None:
        """The handshake finished, or failed: the connection is admitted as a connection, or gone."""
        self._handshaking.pop(transport, None)

    @property
    def handshakes(self) -> int:
        """TLS handshakes in progress."""
        return len(self._handshaking)

    def _room(self) -> bool:
        public = len(self._public) + len(self._handshaking)
        return public <= self.cap - self.reserve and self.open <= self.cap

    def _evict(self, spare: Gated | None = None) -> bool:
        """Close the oldest idle public connection other than ``spare``; False if there is none."""
        victim = next((c for c in self._public if c is not spare and not c.busy), None)
        if victim is None:
            return False
        self.release(victim)
        victim.force_close()
        self.note("evicted")
        return True

    def promote(self, conn: Gated) -> None:
        """Count ``conn`` as a ring connection from now on: it is never evicted for a public one."""
        if conn in self._public:
            del self._public[conn]
            self._ring.add(conn)

    def release(self, conn: Gated) -> None:
        """Forget a connection that closed."""
        self._public.pop(conn, None)
        self._ring.discard(conn)

    def note(self, event: str) -> None:
        """Count an event of resource pressure; log the counts at most once per interval."""
        self.counts[event] += 1
        self._pending[event] += 1
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._quiet_until:
            self.flush()  # the first event of a quiet spell is reported at once
        elif self._flush is None:
            self._flush = loop.call_at(self._quiet_until, self.flush)

    def flush(self) -> None:
        """Log the events counted since the last line, if any, and start a new interval."""
        self._flush = None
        if not self._pending:
            return
        events = ", ".join(
            f"{count} {event.replace('_', ' ')}" for event, count in sorted(self._pending.items())
        )
        log.warning(
            "connections under pressure: %s (open %d of %d, %d ring; at most one such line per %g s)",
            events,
            self.open,
            self.cap,
            len(self._ring),
            self.interval,
        )
        self._pending.clear()
        self._quiet_until = asyncio.get_running_loop().time() + self.interval

    def close(self) -> None:
        """Stop the pending log timer (the server is shutting down)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def exception_handler(
        self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
    ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
        """An event-loop exception handler that counts failed ``accept()`` calls instead of logging each.

        asyncio logs a traceback for each one and retries a second later; out of descriptors, that is a
        line per retry for as long as it lasts. Every other context goes on to ``previous`` (or the
        loop's default handler).
        """

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if context.get("message") == _ACCEPT_ERROR:
                self.note("accept_failed")
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle


class GatedHandler(web.RequestHandler):
    """aiohttp's connection protocol, admitted by a :class:`ConnectionGate` and answering errors in JSON.

    Made by :class:`GatedSite` for each accepted connection; takes aiohttp's ``RequestHandler`` keyword
    arguments (``keepalive_timeout`` is the idle timeout).
    """

    __slots__ = ("_head_timer", "busy", "gate", "heard")

    def __init__(self, manager: web.Server, *, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.gate = gate
        self.busy = 0
        """Requests in progress on this connection; a connection with none is idle."""
        self.heard = False
        """Whether a complete request head has arrived on this connection."""
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection through the gate, or close it at once; start the header timer."""
        super().connection_made(transport)
        if not self.gate.admit(self):
            # abort, not close: the descriptor is what is short, and there is nothing to flush
            if hasattr(transport, "abort"):  # uvloop's transports are not asyncio.Transport subclasses
                transport.abort()
            else:
                transport.close()
            return
        self._head_timer = asyncio.get_running_loop().call_later(self.gate.header_timeout, self._head_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Let the gate forget the connection."""
        self.gate.release(self)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def begin(self) -> None:
        """A request head arrived and its handling starts."""
        self.busy += 1
        if not self.heard:
            self.heard = True
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

    def end(self) -> None:
        """A request's handling ended."""
        self.busy -= 1

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.heard and self.transport is not None:
            self.gate.note("header_timeout")
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not parse (or hand over) with the JSON error shape.

        Logs one line, never a traceback, for a 4xx: a malformed request is the client's fault, and a flood
        of them must not become a flood of tracebacks. A 5xx (the server's fault) keeps its traceback.
        """
        reason = getattr(exc, "message", None) or message or (str(exc) if exc else None)
        reason = (reason or HTTPStatus(status).phrase).strip().replace("\n", " ")[:300]
        if status >= 500:  # not the client's fault: keep what explains it
            log.error(
                "error answering a request from %s: %d %s", request.remote, status, reason, exc_info=exc
            )
        else:
            log.info("refused a malformed request from %s: %d %s", request.remote, status, reason)
        if request.writer.output_size > 0:  # an answer is under way: the connection can only be dropped
            raise ConnectionError("an answer was already being sent")
        kind = "BadRequestError" if status == 400 else HTTPStatus(status).phrase.replace(" ", "")
        body = orjson.dumps({"error": {"type": kind, "message": reason}})
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class GatedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGate`.

    :param runner: a set-up runner; its server dispatches requests and tracks connections for shutdown.
    :param handler_options: aiohttp ``RequestHandler`` keyword arguments (``keepalive_timeout``,
        ``max_line_size``...).
    :param handshake_timeout: seconds a TLS handshake may take (with ``ssl_context``).
    :param binary: makes the protocol for a connection whose first byte is NUL (never the start of an
        HTTP request): the stream transport's RPC connections share the port with HTTP this way. Given
        the connection's deadline (event-loop time) to finish its opening, counted from its accept.
    """

    __slots__ = ("_binary", "_gate", "_handshake_timeout", "_host", "_options", "_port", "_upgrades")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        gate: ConnectionGate,
        handler_options: dict[str, Any],
        ssl_context: Any = None,
        handshake_timeout: float = 60.0,
        binary: Callable[[float], asyncio.Protocol] | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=ACCEPT_BACKLOG)
        self._binary = binary
        self._host, self._port = host, port
        self._gate = gate
        self._options = handler_options
        self._handshake_timeout = handshake_timeout
        self._upgrades: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        """The site's URL."""
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        """Listen."""
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner that is not set up

        def http() -> GatedHandler:
            return GatedHandler(server, gate=self._gate, loop=loop, **self._options)

        connection: Callable[[], asyncio.Protocol] = http
        if (binary := self._binary) is not None:

            def connection() -> asyncio.Protocol:
                return _Sniffer(self._gate, http, binary)

        factory: Callable[[], asyncio.BaseProtocol] = connection
        if self._ssl_context is not None:
            # TLS is started here, after the gate counted the connection, rather than by the server
            # before any protocol hears of it: a crowd that never finishes its handshakes is capped too
            context, timeout = self._ssl_context, self._handshake_timeout

            def factory() -> asyncio.BaseProtocol:
                return _Handshake(self._gate, connection, context, timeout, self._upgrades)

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )

    async def stop(self) -> None:
        """Stop listening; cancel the TLS handshakes in progress."""
        for task in list(self._upgrades):
            task.cancel()
        await super().stop()


class _Handshake(asyncio.Protocol):
    """A TLS connection from its accept to the end of its handshake, counted by the gate all along.

    It starts TLS on the accepted socket within ``timeout`` seconds, then hands the encrypted transport to
    a new :class:`GatedHandler`; a handshake that fails or times out closes the socket.
    """

    def __init__(
        self,
        gate: ConnectionGate,
        handler: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        timeout: float,
        upgrades: set[asyncio.Task[None]],
    ) -> None:
        self.gate = gate
        self.handler = handler
        self.context = context
        self.timeout = timeout
        self.upgrades = upgrades
        self.transport: asyncio.Transport | None = None
        self.early = b""
        """Bytes read before start_tls took the socket over: uvloop starts reading as soon as
        ``connection_made`` returns, and the client's hello may come before the upgrade begins."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses, but the same shape
        if not self.gate.begin_handshake(transport):
            transport.abort()
            return
        self.transport = transport
        transport.pause_reading()  # asyncio honours this; uvloop starts reading after this returns
        task = asyncio.ensure_future(self._upgrade(transport))
        self.upgrades.add(task)
        task.add_done_callback(self.upgrades.discard)

    def data_received(self, data: bytes) -> None:
        """Keep what came early for the TLS protocol (see :attr:`early`); read no more until it runs."""
        self.early += data
        if self.transport is None:
            return
        if len(self.early) > 1 << 16:  # far more than any client hello
            self.transport.abort()
            return
        self.transport.pause_reading()

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        handler = self.handler()
        loop = asyncio.get_running_loop()

        def hand_over() -> None:  # runs after start_tls has made its TLS protocol the socket's
            if self.early and not transport.is_closing():
                _feed(transport.get_protocol(), self.early)
            self.early = b""

        # start_tls schedules its protocol's connection_made before it awaits: two hops later, it ran
        loop.call_soon(loop.call_soon, hand_over)
        try:
            if transport.is_closing():
                return
            encrypted = await loop.start_tls(
                transport, handler, self.context, server_side=True, ssl_handshake_timeout=self.timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, RuntimeError, asyncio.CancelledError) as exc:
            transport.abort()
            if not isinstance(exc, asyncio.CancelledError):
                log.debug("a TLS handshake failed: %s", exc)
            return
        finally:
            self.gate.end_handshake(transport)
        if encrypted is None:
            transport.abort()
            return
        handler.connection_made(encrypted)


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` to ``protocol`` as its transport would, buffered protocol or not."""
    if hasattr(protocol, "get_buffer"):  # uvloop's TLS protocol has the methods, not the base class
        buffered = cast(asyncio.BufferedProtocol, protocol)
        view = memoryview(data)
        while view:
            buffer = memoryview(buffered.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            buffered.buffer_updated(size)
            view = view[size:]
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


class _Sniffer(asyncio.Protocol):
    """A new connection until its first byte tells what it speaks: NUL for a binary protocol, else HTTP.

    Counted by the gate as an idle public connection meanwhile, and closed if nothing arrives within the
    header timeout. On the first bytes it hands the transport to the protocol they call for.
    """

    busy = 0

    def __init__(
        self,
        gate: ConnectionGate,
        http: Callable[[], asyncio.Protocol],
        binary: Callable[[float], asyncio.Protocol],
    ) -> None:
        self.gate = gate
        self.http = http
        self.binary = binary
        self.transport: asyncio.Transport | None = None
        self.deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._early = b""  # bytes that came before connection_made (TLS: with the handshake's end)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses, but the same shape
        if not self.gate.admit(self):
            transport.abort()
            return
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.gate.header_timeout
        self._timer = loop.call_at(self.deadline, self._late)
        if self._early:
            self.data_received(self._early)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            self._early += data
            return
        if not data:
            return
        self._forget()
        protocol = self.binary(self.deadline) if data[0] == 0 else self.http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_closing():
            protocol.data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._forget()

    def force_close(self) -> None:
        """Drop the connection (the gate evicts it, or it sent nothing in time)."""
        self._forget()
        if self.transport is not None:
            self.transport.abort()

    def _late(self) -> None:
        self._timer = None
        self.gate.note("header_timeout")
        self.force_close()

    def _forget(self) -> None:
        self.gate.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
