"""The node's public gRPC port: a listener whose connections a ``ConnectionGate`` admits, each relayed to
the gRPC server on loopback.

gRPC accepts every connection its listener is offered, with no hook to refuse one, so a crowd of sockets
that send nothing could fill the process's descriptor table and cut the node off from its own ring and
its clients. The port the ring knows the node by is therefore an asyncio listener, :class:`GatedPort`, and
the gRPC server listens on an ephemeral port of 127.0.0.1. Each connection accepted on the public port:

- is counted in by a :class:`~balancer.plugins.connections.ConnectionGate` (the HTTP port's rules: a cap,
  a reserve of it for ring connections, the oldest idle public connection evicted to make room, pressure
  logged once per interval), else closed at once;
- holds one descriptor until its first bytes arrive; only then is its relay to the gRPC server dialled
  (three descriptors from then on: the caller's socket, the relay's and gRPC's end of it);
- must make an authenticated ring RPC within ``header_timeout`` seconds (TLS handshake included), else it
  is closed; the ring service says so with :meth:`GatedPort.served`, which promotes the connection to the
  reserve, and counts the calls it has in progress (a connection with none is idle, so evictable while it
  is still public);
- is closed when the gRPC server closes its end (``grpc.max_connection_idle_ms``, GOAWAY after
  ``grpc.max_connection_age_ms``, too many pings...), and the reverse.

Bytes are relayed as they come, TLS included (the gRPC server terminates it, and sees the caller's
certificate), with backpressure both ways. The gRPC server answers only calls relayed by this port:
:meth:`GatedPort.served` returns ``None`` for any other caller (a local process that dialled the loopback
port directly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from balancer.plugins.connections import ACCEPT_BACKLOG, ConnectionGate, fitted_cap

__all__ = ["OUTGOING", "RELAY_DESCRIPTORS", "GatedPort", "Relay", "fitted_caps"]

log = logging.getLogger(__name__)

RELAY_DESCRIPTORS = 3
"""Descriptors a relayed connection holds: the caller's socket, the relay's to the gRPC server, and the
server's end of that."""

OUTGOING = 100
"""Descriptors left for the node's own channels to its peers (one each), as the HTTP transport leaves for
its client's connections."""

_BUFFERED = 1 << 18  # bytes held for a relay still dialling before the caller is read no more
STALL = 30.0
"""Most seconds a caller may leave what the gRPC server sent it unread (its socket's buffer full) before
the relay is dropped: a ring connection is never evicted, and one that stops reading would hold its
place for good."""
LINGER = 5.0
"""Most seconds a relay closed gracefully may spend flushing what it holds for a peer that does not read
before both its sockets are dropped; until they are, it still counts against the cap."""


def fitted_caps(requested: int, *, soft_limit: int | None = None) -> tuple[int, int]:
    """The connection caps of the HTTP port and of the gRPC port: ``requested`` each, lowered so that both
    fit the open-file limit together.

    Each HTTP connection holds one descriptor, each gRPC one up to :data:`RELAY_DESCRIPTORS`; room is left
    for :data:`OUTGOING` channels and a burst of accepts on each port (the reasons of
    :func:`~balancer.plugins.connections.fitted_cap`, which does the sums). When they must shrink, the gRPC
    port gets a quarter of the descriptors (only ring members need it), or what the HTTP port leaves of
    them if more; neither gets more than ``requested``, nor fewer than 16.
    ``soft_limit`` is ``RLIMIT_NOFILE``'s soft limit, read from the process when not given.
    """
    wanted = requested * (1 + RELAY_DESCRIPTORS)
    budget = fitted_cap(wanted, outgoing=OUTGOING + 2 * ACCEPT_BACKLOG, soft_limit=soft_limit)
    if budget >= wanted:
        return requested, requested
    grpc = max(16, budget // (4 * RELAY_DESCRIPTORS))
    http = min(requested, max(16, budget - RELAY_DESCRIPTORS * grpc))
    return http, min(requested, max(grpc, (budget - http) // RELAY_DESCRIPTORS))


class Relay(asyncio.Protocol):
    """One connection accepted on the public port, and its relay to the gRPC server.

    Made by :class:`GatedPort`; counted by its gate, which may close it (:meth:`force_close`).
    """

    def __init__(self, port: GatedPort) -> None:
        self.port = port
        self.busy = 0
        """Ring RPCs in progress on the connection; one with none is idle, and may be evicted."""
        self.ring = False
        """Whether the connection made an authenticated ring RPC (it is in the gate's reserve)."""
        self.outer: asyncio.Transport | None = None
        self.inner: asyncio.Transport | None = None
        self._inner_port: int | None = None  # the local port of the relay's socket: the server's name for it
        self._pending: list[bytes] = []  # what came before the relay was dialled
        self._pending_size = 0
        self._dialling: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._closed = False
        self._inner_paused = False  # the gRPC server's side is full: the caller is not read meanwhile

    # -- the caller's side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection in through the gate, or close it at once; start its opening timer."""
        outer = cast(asyncio.Transport, transport)  # uvloop's are not subclasses, but the same shape
        if not self.port.gate.admit(self):
            self._closed = True
            outer.abort()  # the descriptor is what is short, and there is nothing to flush
            return
        self.outer = outer
        self.port.relays.add(self)
        self._timer = asyncio.get_running_loop().call_later(self.port.gate.header_timeout, self._late)

    def data_received(self, data: bytes) -> None:
        """Relay the caller's bytes to the gRPC server (dialling it on the first ones)."""
        if self._closed:
            return
        if self.inner is not None:
            self.inner.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > _BUFFERED and self.outer is not None:
            self.outer.pause_reading()
        if self._dialling is None:
            self._dialling = asyncio.ensure_future(self._dial())

    def eof_received(self) -> bool | None:
        """The caller stopped sending: HTTP/2 has no use for a half-open connection, so close it."""
        self.close()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        """The caller's connection is gone: close the relay too."""
        self.outer = None
        self.close()
        self._gone()

    def pause_writing(self) -> None:
        """The caller reads slower than the gRPC server answers: stop reading the server (for at most
        :data:`STALL` seconds)."""
        if self.inner is not None:
            self.inner.pause_reading()
        if self._stall is None and not self._closed:
            self._stall = asyncio.get_running_loop().call_later(STALL, self._stalled)

    def resume_writing(self) -> None:
        """The caller caught up: read the server again."""
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self.inner is not None:
            self.inner.resume_reading()

    def _stalled(self) -> None:
        self._stall = None
        self.port.gate.note("stalled")
        self.force_close()

    # -- the gRPC server's side -------------------------------------------------------------------

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Inward(self), "127.0.0.1", self.port.inner_port
            )
        except OSError as exc:
            if not self._closed:
                self.port.gate.note("relay_failed")
                log.debug("could not relay a connection to the gRPC server: %s", exc)
                self.close()
            return
        if self._closed:
            transport.abort()
            return
        self.inner = transport
        self._inner_port = int(transport.get_extra_info("sockname")[1])
        self.port.by_port[self._inner_port] = self
        pending, self._pending, self._pending_size = self._pending, [], 0
        transport.writelines(pending)
        if self.outer is not None and not self._inner_paused:  # that write may have filled it again
            self.outer.resume_reading()

    def answered(self, data: bytes) -> None:
        """Relay the gRPC server's bytes to the caller."""
        if self.outer is not None and not self._closed:
            self.outer.write(data)

    # -- the gate's view --------------------------------------------------------------------------

    def promote(self) -> None:
        """The connection made an authenticated ring RPC: keep it in the reserve, and stop its timer."""
        if self.ring or self._closed:
            return
        self.ring = True
        self.port.gate.promote(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if not self.ring and not self._closed:
            self.port.gate.note("header_timeout")
            self.force_close()

    def force_close(self) -> None:
        """Drop both ends now, whatever they were doing (the gate evicts the connection, or it was late)."""
        self._stop(abort=True)

    def close(self) -> None:
        """Close both ends once what is buffered for them is sent."""
        self._stop(abort=False)

    def _stop(self, *, abort: bool) -> None:
        if self._closed:
            # a second call (the linger ran out, the gate evicts it) aborts what a graceful close left
            if abort:
                for transport in (self.outer, self.inner):
                    if transport is not None:
                        transport.abort()
            return
        self._closed = True
        port = self.port
        if self._inner_port is not None and port.by_port.get(self._inner_port) is self:
            del port.by_port[self._inner_port]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dialling is not None and not self._dialling.done():
            self._dialling.cancel()
        self._pending.clear()
        for transport in (self.outer, self.inner):
            if transport is None:
                continue
            if abort:
                transport.abort()
            else:
                transport.close()
        if not abort and (self.outer is not None or self.inner is not None):
            # a graceful close waits for its buffers to flush: never longer than LINGER
            self._linger = asyncio.get_running_loop().call_later(LINGER, self.force_close)
        self._gone()

    def inner_lost(self, transport: asyncio.BaseTransport) -> None:
        """The relay's connection to the gRPC server is gone (``transport``): close the caller's too."""
        if transport is self.inner:
            self.inner = None
        self.close()
        self._gone()

    def inner_paused(self, paused: bool) -> None:
        """The gRPC server's side is full (``paused``), or has room again: stop or resume the caller."""
        self._inner_paused = paused
        if self.outer is not None:
            if paused:
                self.outer.pause_reading()
            elif self._pending_size <= _BUFFERED:
                self.outer.resume_reading()

    def _gone(self) -> None:
        """Once closed and both sockets are gone, the connection no longer counts against the cap: until
        then its descriptors are held, so it is counted (and may be evicted, which aborts it)."""
        if self._closed and self.outer is None and self.inner is None:
            self.port.gate.release(self)
            self.port.relays.discard(self)
            for timer in (self._linger, self._stall):
                if timer is not None:
                    timer.cancel()
            self._linger = self._stall = None


class _Inward(asyncio.Protocol):
    """The relay's connection to the gRPC server: answers go back to the caller."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.relay.answered(data)

    def eof_received(self) -> bool | None:
        self.relay.close()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is not None:
            self.relay.inner_lost(self.transport)

    def pause_writing(self) -> None:
        self.relay.inner_paused(True)

    def resume_writing(self) -> None:
        self.relay.inner_paused(False)


class GatedPort:
    """The public port of a gRPC server listening on 127.0.0.1: see the module documentation.

    :param gate: admits, times and evicts the port's connections (its ``header_timeout`` is the time a
        new connection has to make an authenticated ring RPC).
    :param inner_port: the gRPC server's port on 127.0.0.1.
    """

    def __init__(self, gate: ConnectionGate, inner_port: int) -> None:
        self.gate = gate
        self.inner_port = inner_port
        self.relays: set[Relay] = set()
        """The connections open on the port."""
        self.by_port: dict[int, Relay] = {}
        """Relays by the local port of their connection to the gRPC server (how the server names them)."""
        self.port: int | None = None
        """The public port, once listening."""
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, host: str, port: int) -> int:
        """Listen on ``host``:``port`` (``""``: every interface; 0 picks a free port) and return the port
        bound; raises :class:`OSError` if it cannot be bound."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = lambda: Relay(self)  # noqa: E731 (the factory is its name)
        where = host or None
        server = await loop.create_server(factory, where, port, backlog=ACCEPT_BACKLOG, reuse_address=True)
        ports = {int(sock.getsockname()[1]) for sock in server.sockets}
        if len(ports) > 1:  # port 0 on every interface: each family got a port of its own; take one for both
            server.close()
            await server.wait_closed()
            server = await loop.create_server(
                factory, where, min(ports), backlog=ACCEPT_BACKLOG, reuse_address=True
            )
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])
        return self.port

    def served(self, peer: str) -> Relay | None:
        """The relay of a call the gRPC server is serving, from the call's ``context.peer()``
        (``ipv4:127.0.0.1:PORT``); ``None`` if the call did not come through this port."""
        host, _, number = peer.rpartition(":")
        if host != "ipv4:127.0.0.1" or not number.isdigit():
            return None
        return self.by_port.get(int(number))

    def stop_listening(self) -> None:
        """Accept no more connections; those open stay (the gRPC server's shutdown drains them)."""
        if self._server is not None:
            self._server.close()

    async def aclose(self) -> None:
        """Stop listening and drop every connection still open; calling it again does nothing."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for relay in list(self.relays):
            relay.force_close()
        self.gate.close()
        if server is not None:
            await server.wait_closed()
