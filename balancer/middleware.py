"""aiohttp middleware that routes each request to the owner of its key, and a balanced client session.

Server side: :func:`setup_routing` puts a :class:`RingRouter` in front of an aiohttp application. For every
request it derives a routing key (by default the ``key`` path parameter, else the ``X-Balancer-Key``
header); requests without a key are handled locally. The key's owner comes from a running ring
:class:`~balancer.node.Node` or from a :class:`~balancer.bounded.BoundedLoadBalancer` over a static list of
backends, where the load is the number of requests in flight. If the owner is this server the request is
handled here; otherwise it is proxied to the owner (bodies streamed both ways, hop-by-hop headers
stripped) or, in ``"redirect"`` mode, answered with 307 to the owner.

Requests without a body or with a small one of known length (the usual API call) are proxied over the
router's own keep-alive HTTP/1.1 connections to the owners, with one write per request; requests whose
body must stream, and owners whose base URL is not plain ``http://host:port``, go through aiohttp's
client. Either way the target is passed on as the client sent it (still percent-encoded).

With a ring node and a ``load_factor``, the router balances instead over the ring's live members: a
:class:`MemberBalancer` keeps a bounded-load balancer whose node names are the addresses of the members the
node sees live, weighted by their ``weight``, and follows the node's ``balancer_membership_changed`` event,
so a hot key's overflow spreads over the ring instead of piling onto its owner. Members that stay keep
their loads when others join or leave. Until the node has a view (before it starts), the key's owner is
looked up as without ``load_factor``.

Every forwarded request carries ``X-Balancer-Hops``. With a ring, a receiver whose view names another
owner forwards again, but a request already forwarded ``max_hops`` times is refused with 508, so two servers
that disagree about an owner cannot bounce a request forever. With a balancer (static or over the ring's
members), the server that forwards a request has made the choice (and counts its load), so the receiver
serves it, but only if the forward is proven: routers sharing a secret (``secret=``, or a ring node's
cluster secret) add ``X-Balancer-Forwarded``, an HMAC over the hop count, method, destination, path and a
timestamp. A hop count a client wrote itself is only counted for the loop guard and never makes a server
skip routing; one that is not a small decimal number gets 400. An owner that cannot be reached gives 502,
one that does not answer in time 504, both with a JSON error saying which.

Client side: :class:`BalancedSession` sends each request to the backend chosen by bounded-load consistent
hashing of its key, over a static list of backends or over a ring node's live members, and retries on the
key's next candidate when a backend fails.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.typedefs import Middleware
from yarl import URL

from balancer.auth import rpc_secret, sign
from balancer.bounded import DEFAULT_LOAD_FACTOR, BoundedLoadBalancer, Lease, Move
from balancer.errors import BadRequestError, BalancerError, CapacityError, ConfigError
from balancer.hookspecs import hookimpl
from balancer.types import Member, NodeInfo

if TYPE_CHECKING:
    from fractions import Fraction

    from balancer.node import Node

__all__ = [
    "FORWARDED_HEADER",
    "HOPS_HEADER",
    "HOP_BY_HOP",
    "KEY_HEADER",
    "ROUTER",
    "BalancedSession",
    "MemberBalancer",
    "RingRouter",
    "check_router",
    "default_key",
    "forward_is_proven",
    "forward_secret",
    "parse_hops",
    "proof_path",
    "prove_forward",
    "setup_routing",
]

log = logging.getLogger(__name__)

KEY_HEADER = "X-Balancer-Key"
"""Header a client may set to name the routing key when the path has none."""
HOPS_HEADER = "X-Balancer-Hops"
"""How many times a request has been forwarded already (the loop guard)."""
FORWARDED_HEADER = "X-Balancer-Forwarded"
"""``<timestamp ms>:<HMAC>``: proves a router sharing the secret forwarded the request with its hop count."""

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)
"""Header names (lowercase) meaningful for one connection only, never forwarded (RFC 9110 section 7.6.1),
and ``host``, which a forward writes for its owner."""


_NOT_PASSED = HOP_BY_HOP | {
    h.lower() for h in (HOPS_HEADER, FORWARDED_HEADER, "X-Forwarded-For", "X-Forwarded-Host")
}
"""Request headers a forward never passes on: hop-by-hop ones, and the ones it writes itself."""

_NOT_PASSED_RAW = frozenset(h.encode() for h in _NOT_PASSED)
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")

_BUFFERED = 1 << 16
"""Bodies up to this size with a known length travel in one piece: a request's is read before it is sent
on (over the router's own keep-alive connections), an upstream answer's is sent back in one write."""

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods a request may be sent again with (RFC 9110 section 9.2.2) when a kept-alive connection turns
out to have been closed by the backend as the request went out."""


def default_key(request: web.Request) -> str | None:
    """The ``key`` path parameter, else the ``X-Balancer-Key`` header, else None (handled locally)."""
    return request.match_info.get("key") or request.headers.get(KEY_HEADER)


def _named(connection: str | None) -> frozenset[str]:
    """The header names a ``Connection`` header's value lists, lowercase (RFC 9110 section 7.6.1)."""
    if not connection:
        return frozenset()
    return frozenset(t for t in (v.strip().lower() for v in connection.split(",")) if t)


def _forwardable(headers: Mapping[str, str], always: frozenset[str] = HOP_BY_HOP) -> list[tuple[str, str]]:
    """The headers of ``headers`` a proxy passes on: none of ``always``, nor any its ``Connection`` names."""
    named = _named(headers.get("Connection"))
    dropped = always | named if named else always
    return [(k, v) for k, v in headers.items() if k.lower() not in dropped]


def _forward_proof(secret: str, hops: int, method: str, owner: str, path_qs: str, timestamp: str) -> str:
    """The HMAC of a forward, signed the way ring RPCs are: the hop count stands in the nonce's place and
    the path in the body's."""
    return sign(secret, method, owner, timestamp, f"hops {hops}", path_qs.encode("utf-8", "surrogatepass"))


def prove_forward(secret: str, hops: int, method: str, owner: str, path_qs: str) -> str:
    """The ``X-Balancer-Forwarded`` value for a forward to ``owner`` with hop count ``hops`` (the count the
    owner receives), signed now. ``path_qs`` is the target's :func:`proof_path`.

    Routers of other frameworks write and check forwards with this and :func:`forward_is_proven`, so that
    they and this module's routers serve what the others forwarded.
    """
    timestamp = str(int(time.time() * 1000))
    return f"{timestamp}:{_forward_proof(secret, hops, method, owner, path_qs, timestamp)}"


def forward_is_proven(
    secret: str, value: str, hops: int, method: str, owner: str, path_qs: str, max_skew: float
) -> bool:
    """Whether ``value``, an ``X-Balancer-Forwarded`` header, proves that a router holding ``secret``
    forwarded this request (``method``, ``path_qs`` as :func:`proof_path` gives it) to ``owner`` with this
    hop count, less than ``max_skew`` seconds ago (by this machine's clock)."""
    timestamp, _, proof = value.partition(":")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16 and proof.isascii()):
        return False
    if abs(time.time() - int(timestamp) / 1000) > max_skew:
        return False
    expected = _forward_proof(secret, hops, method, owner, path_qs, timestamp)
    return hmac.compare_digest(expected, proof)


def proof_path(target: str) -> str:
    """The form of a request target (origin form, as sent: ``/a%20b?q=1``) that a forward's proof signs:
    the decoded path and query, as aiohttp's ``request.rel_url.path_qs`` gives them."""
    path, _, query = target.partition("#")[0].partition("?")
    return URL.build(path=path, query_string=query, encoded=True).path_qs


def check_router(
    node: object | None,
    balancer: object | None,
    *,
    max_hops: int,
    timeout: float,
    load_factor: object | None = None,
    mode: str | None = None,
) -> None:
    """Refuse router settings that cannot work, with the same rules and messages for every router (this
    aiohttp one, and the ASGI and gRPC ones of the contrib packages): raises :class:`ConfigError`."""
    if (node is None) == (balancer is None):
        raise ConfigError("give exactly one of node= (ring ownership) and balancer= (static backends)")
    if load_factor is not None and node is None:
        raise ConfigError("load_factor= balances over a ring node's members: give it with node=")
    if mode is not None and mode not in ("proxy", "redirect"):
        raise ConfigError(f"mode must be 'proxy' or 'redirect', got {mode!r}")
    if max_hops < 1:
        raise ConfigError("max_hops must be at least 1")
    if not timeout > 0:
        raise ConfigError(f"timeout must be positive, got {timeout}")


def forward_secret(node: Node | None, secret: str | None) -> str | None:
    """The secret a router proves its forwards with: ``secret``, else its ring node's own RPC key."""
    if secret is None and node is not None:
        return rpc_secret(node.config.cluster_secret, node.config.api_token)
    return secret


def parse_hops(given: str | None) -> int:
    """The hop count an ``X-Balancer-Hops`` value says (0 when absent); raises :class:`BadRequestError`
    unless it is a decimal number of at most three ASCII digits."""
    if given is None:
        return 0
    # isdigit alone accepts "²" and other digits int() refuses; ASCII and short keeps int() total
    if not (given.isascii() and given.isdigit() and len(given) <= 3):
        raise BadRequestError(f"{HOPS_HEADER} must be a number of hops (0 to 999), got {given[:20]!r}")
    return int(given)


def _error(status: int, kind: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"type": kind, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


def _release(balancer: BoundedLoadBalancer, lease: Lease) -> None:
    """Give ``lease`` back; a balancer whose last node left meanwhile has dropped it already."""
    try:  # not contextlib.suppress: this runs once per proxied request, and the context manager costs
        balancer.release(lease)
    except BalancerError:
        log.debug("the lease %s was dropped with its node", lease)


def _http_url(address: str) -> str:
    return f"http://{address}"


class MemberBalancer:
    """A bounded-load balancer over a ring node's live members, by address, kept current as they change.

    :attr:`balancer`'s node names are the addresses (``host:port``) of the members ``node`` sees live
    (:attr:`Member.live <balancer.types.Member.live>`), weighted by their ``weight``. :meth:`start` fills
    it from ``node.members()`` and registers this object as a plugin on ``node.pm``, so each
    ``balancer_membership_changed`` event of ``node`` updates it; :meth:`stop` unregisters it. Only
    ``node``'s own view counts: events of other nodes sharing its plugin manager are ignored.

    Members that stay keep their loads; the load a departing member held is placed on the others (so a
    lease taken on it is still released correctly). A member whose weight changes leaves and joins again.

    :param node: the ring node whose view decides.
    :param load_factor: the balancer's ``c``, in any form :func:`~balancer.bounded.parse_load_factor`
        reads (``1.25``, ``125``, ``"125%"``, ``"inf"``).
    """

    def __init__(self, node: Node, *, load_factor: float | str | Fraction = DEFAULT_LOAD_FACTOR) -> None:
        self.node = node
        self.balancer = BoundedLoadBalancer(load_factor=load_factor)
        """The balancer itself (empty until the node has a view); owned by this object."""
        self._weights: dict[str, float] = {}
        self._registered = False

    @property
    def started(self) -> bool:
        """Whether this object follows the node's events (between :meth:`start` and :meth:`stop`)."""
        return self._registered

    def start(self) -> None:
        """Follow the node: register on ``node.pm`` and take its current view. Does nothing if started."""
        if self._registered:
            return
        self.node.pm.register(self)
        self._registered = True
        self.update(self.node.members())

    def stop(self) -> None:
        """Stop following the node: unregister from ``node.pm``. The balancer keeps its last view."""
        if self._registered:
            self.node.pm.unregister(self)
            self._registered = False

    def update(self, members: Iterable[Member]) -> list[Move]:
        """Make the balancer's nodes the live members among ``members``; returns the loads this moved.

        Members joining are added before members leaving are removed, so the load of a departing member
        goes to the members of the new view.
        """
        wanted = {
            m.address: m.weight
            for m in members
            if m.live and m.address and math.isfinite(m.weight) and m.weight > 0
        }
        lb = self.balancer
        moves: list[Move] = []
        for address, weight in wanted.items():
            if address not in self._weights:
                moves += lb.add_node(address, weight)
        for address, weight in self._weights.items():
            if address not in wanted:
                moves += lb.remove_node(address)
            elif wanted[address] != weight:
                moves += lb.remove_node(address)
                moves += lb.add_node(address, wanted[address])
        if wanted != self._weights:
            log.debug("balancing over %s", ", ".join(wanted) or "no members")
        self._weights = wanted
        return moves

    @hookimpl
    def balancer_membership_changed(self, node: NodeInfo, members: tuple[Member, ...]) -> None:
        """Take ``members`` if they are the view of this object's node."""
        if node.address == self._own_address():
            self.update(members)

    def _own_address(self) -> str | None:
        try:
            return self.node.address
        except BalancerError:  # not started: no event can be its own
            return None


# -- the proxy's own keep-alive client ------------------------------------------------------------
#
# Most proxied requests are small and sized: a GET, or a body of a few KiB with a Content-Length. For those
# aiohttp's client spends most of a request's CPU on machinery a proxy does not use (a timeout context and
# trace hooks per request, the cookie jar, URL building, header objects made and copied several times), so
# the router sends them over its own connections: one buffered write of the request, the answer parsed
# from the bytes as they arrive. Requests with bodies that must stream (large, or of unknown length) and
# backends that are not plain ``http://host:port`` take aiohttp's client as before.

_MAX_HEAD = 1 << 16
"""Most bytes an upstream answer's status line and headers may take."""
_MAX_LINE = 1 << 12
"""Most bytes a chunk-size line or a trailer line of a chunked upstream answer may take."""
_HIGH_WATER = 1 << 18
"""An upstream connection stops reading while this many bytes wait for the client to take them."""
_IDLE_SECONDS = 15.0
"""A kept-alive connection idle this long is closed instead of reused (aiohttp's client default)."""
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name (RFC 9110 section 5.6.2)."""
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
"""The size of one chunk of a chunked body, in hex; 15 digits are beyond any body this proxy passes."""


class _UpstreamError(Exception):
    """The backend broke the exchange: it closed the connection early or answered what is not HTTP/1.1."""


class _StaleConnectionError(_UpstreamError):
    """A kept-alive connection was closed before a byte of the answer came: the backend may have closed it
    as the request went out (its idle timeout), so the request may not have been seen at all."""


class _Answer(NamedTuple):
    """The head of an upstream answer and how its body is framed (a named tuple: one is made per
    proxied request, and a tuple is made at a third of a frozen dataclass's cost)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    """The end-to-end headers, in order: hop-by-hop ones and those ``Connection`` names are left out."""
    length: int | None
    """Bytes of body; ``None`` with :attr:`chunked` false means the body runs until the backend closes."""
    chunked: bool
    keep_alive: bool
    """Whether the connection may carry another exchange once this body is read."""


_FRAMING = HOP_BY_HOP | {"content-length"}
"""Answer headers that say how the answer is framed, or are hop-by-hop: looked at one by one."""


def _parse_head(head: bytes, method: str) -> _Answer | None:
    """The answer whose head (without its final empty line) is ``head``; ``None`` for an interim 1xx
    answer, to be skipped. Raises :class:`_UpstreamError` for anything but a well-formed HTTP/1.x head.
    """
    text = head.decode("utf-8", "surrogateescape")  # as aiohttp decodes headers, so bytes round-trip
    lines = text.split("\r\n")
    # a CR or LF that is not part of a line ending could smuggle a header into what the client sees
    if not (head.count(b"\n") == head.count(b"\r") == len(lines) - 1) or b"\0" in head:
        raise _UpstreamError("the answer's head has stray line breaks")
    first = lines[0]  # "HTTP/1.1 200 OK"
    version, code = first[:8], first[9:12]
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or first[8:9] != " "
        or first[12:13] not in ("", " ")
        or not (code.isascii() and code.isdigit())
        or code[0] == "0"
    ):
        raise _UpstreamError(f"not an HTTP/1.1 status line: {first[:60]!r}")
    status = int(code)
    if status < 200:
        if status == 101:  # nothing asked to switch protocols: Upgrade is never forwarded
            raise _UpstreamError("the backend switched protocols unasked")
        return None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    codings: list[str] = []
    tokens: set[str] = set()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise _UpstreamError(f"malformed header line in the answer: {line[:60]!r}")
        value = value.strip(" \t")
        lower = name.lower()
        if lower not in _FRAMING:
            headers.append((name, value))
        elif lower == "content-length":
            for part in value.split(","):
                digits = part.strip(" \t")
                if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
                    raise _UpstreamError(f"malformed Content-Length in the answer: {value[:40]!r}")
                if length is not None and int(digits) != length:
                    raise _UpstreamError(f"conflicting Content-Length in the answer: {value[:40]!r}")
                length = int(digits)
            headers.append((name, value))
        elif lower == "transfer-encoding":
            codings += (c.strip(" \t").lower() for c in value.split(","))
        elif lower == "connection":
            tokens.update(t.strip(" \t").lower() for t in value.split(","))
    tokens.discard("")
    if tokens:
        headers = [(k, v) for k, v in headers if k.lower() not in tokens]
    keep_alive = version == "HTTP/1.1" and "close" not in tokens
    reason = first[13:]
    if method == "HEAD" or status in (204, 304):
        return _Answer(status, reason, headers, 0, False, keep_alive)
    if codings:
        if codings != ["chunked"]:  # only chunked is undone here; anything else would reach the client
            raise _UpstreamError(f"unsupported transfer coding in the answer: {', '.join(codings)}")
        # RFC 9112 section 6.3: chunked wins over a Content-Length, and the connection is not trusted after
        return _Answer(status, reason, headers, None, True, keep_alive and length is None)
    return _Answer(status, reason, headers, length, False, keep_alive and length is not None)


class _Channel(asyncio.Protocol):
    """One connection to a backend, carrying one exchange at a time; its :class:`_Pool` keeps it alive
    between exchanges."""

    def __init__(self, pool: _Pool, upstream: _Upstream) -> None:
        self.pool = pool
        self.upstream = upstream
        self.buffer = bytearray()
        """Bytes received and not taken yet."""
        self.eof = False
        self.closed = False
        self.used = False
        """Whether an exchange completed on this connection before (so an early close may be stale)."""
        self.idle_since = 0.0
        self.deadline = math.inf
        """When the exchange under way runs out of time (event-loop clock); see :meth:`_Pool.watch`."""
        self.expired = False
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._forgotten = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        """Buffer ``data``, wake the reader, and stop reading while the client is slower than the backend."""
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        """The backend is done sending: wake the reader; the transport closes."""
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Wake the reader and give the connection's place in the pool back."""
        self.eof = self.closed = True
        self._wake()
        self._forget()

    # exchanges

    def send(self, data: bytes) -> None:
        """Write ``data`` (a whole request); raises :class:`_StaleConnectionError` on a closed connection."""
        if self.closed or self._transport is None or self._transport.is_closing():
            raise _StaleConnectionError("the connection was closed")
        self._transport.write(data)

    async def more(self) -> bool:
        """Wait until more bytes arrived or the backend stopped sending; ``False`` once it has stopped.
        Raises ``TimeoutError`` once the exchange's deadline passed."""
        if self.expired:
            raise TimeoutError
        if self.eof:
            return False
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        waiter = self._waiter = self.pool.loop.create_future()
        await waiter
        return True

    async def read_answer(self, method: str) -> _Answer:
        """The head of the answer to the request sent last; interim 1xx answers are skipped."""
        interim = False
        while True:
            searched = 0
            while (end := self.buffer.find(b"\r\n\r\n", searched)) < 0:
                if len(self.buffer) > _MAX_HEAD:
                    raise _UpstreamError(f"the answer's head is larger than {_MAX_HEAD} bytes")
                searched = max(0, len(self.buffer) - 3)
                if not await self.more():
                    if not self.buffer and self.used and not interim:
                        raise _StaleConnectionError("the backend closed a kept-alive connection unanswered")
                    raise _UpstreamError("the backend closed the connection before its answer's head ended")
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            answer = _parse_head(head, method)
            if answer is not None:
                return answer
            interim = True

    async def read_exactly(self, size: int) -> bytes | bytearray:
        """The next ``size`` bytes; :class:`_UpstreamError` if the backend stops sending first."""
        buffer = self.buffer
        while len(buffer) < size:
            if not await self.more():
                raise _UpstreamError(
                    f"the backend closed the connection {len(buffer)} bytes into a {size}-byte body"
                )
        if len(buffer) == size:  # the usual case: hand the buffer over instead of copying it
            self.buffer = bytearray()
            return buffer
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    async def copy_body(self, answer: _Answer, write: Callable[[bytes | bytearray], Awaitable[None]]) -> None:
        """Pass ``answer``'s body to ``write`` piece by piece, as it arrives (chunked framing undone)."""
        if answer.chunked:
            while size := await self._chunk_size():
                await self._copy(size, write)
                if await self._line() != b"":
                    raise _UpstreamError("a chunk of the answer is longer than its size")
            trailers = 0
            while line := await self._line():  # trailers are not passed on (Trailer is hop-by-hop)
                trailers += len(line)
                if trailers > _MAX_HEAD:
                    raise _UpstreamError(f"the answer's trailers are larger than {_MAX_HEAD} bytes")
        elif answer.length is not None:
            await self._copy(answer.length, write)
        else:
            while self.buffer or await self.more():
                if self.buffer:
                    await write(self._take(len(self.buffer)))

    def reusable(self, answer: _Answer) -> bool:
        """Whether the connection may carry another exchange now that ``answer`` was read whole."""
        return answer.keep_alive and not self.buffer and not self.eof and not self.closed

    def expire(self) -> None:
        """The exchange's deadline passed: the reader gets ``TimeoutError`` now or at its next wait."""
        self.expired = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def close(self) -> None:
        """Close the connection (its exchange is abandoned) and give its place in the pool back."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        self._forget()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _forget(self) -> None:
        if not self._forgotten:
            self._forgotten = True
            self.pool.forget(self)

    def _take(self, size: int) -> bytes | bytearray:
        buffer = self.buffer
        if len(buffer) <= size:
            self.buffer = bytearray()
            return buffer
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    async def _copy(self, size: int, write: Callable[[bytes | bytearray], Awaitable[None]]) -> None:
        while size:
            if not self.buffer and not await self.more():
                raise _UpstreamError("the backend closed the connection before the answer's body ended")
            if self.buffer:
                data = self._take(size)
                size -= len(data)
                await write(data)

    async def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_LINE:
                raise _UpstreamError("a line of the chunked answer is too long")
            if not await self.more():
                raise _UpstreamError("the backend closed the connection inside a chunked answer")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def _chunk_size(self) -> int:
        line = await self._line()
        digits = line.partition(b";")[0].strip(b" \t")  # chunk extensions are ignored
        if _CHUNK_SIZE.fullmatch(digits) is None:
            raise _UpstreamError(f"malformed chunk size in the answer: {line[:40]!r}")
        return int(digits, 16)


class _Upstream:
    """A backend the router reaches over its own connections, and its idle kept-alive connections."""

    __slots__ = ("authority", "host", "idle", "port")

    def __init__(self, host: str, port: int, authority: str) -> None:
        self.host = host
        self.port = port
        self.authority = authority
        """The ``Host`` header the backend gets (``host:port``, the port left out when it is 80)."""
        self.idle: list[_Channel] = []
        """Idle connections, the most recently used last."""


def _upstream(base: str) -> _Upstream | None:
    """The backend at base URL ``base`` if it is plain ``http://host[:port]`` (no path, no user), else
    ``None``: the router's own client does not speak TLS nor rebase paths."""
    try:
        parts = urlsplit(base)
        port = parts.port or 80
    except ValueError:
        return None
    host = parts.hostname
    if (
        parts.scheme != "http"
        or not host
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        return None
    if not re.fullmatch(r"[A-Za-z0-9.:\[\]_%-]+", parts.netloc):
        return None
    name = f"[{host}]" if ":" in host else host
    return _Upstream(host, port, name if port == 80 else f"{name}:{port}")


class _Pool:
    """The router's connections to its backends: kept alive between requests, at most ``limit`` open.

    Exchanges run out of time by a sweep every ``tick`` seconds over the connections in use rather than
    by a timer each: a timer per request costs more than the rest of the pool's work for it, and a
    deadline met up to one tick late is still met.
    """

    def __init__(self, limit: int, tick: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.tick = tick
        self.open = 0
        """Connections open or being opened."""
        self._upstreams: dict[str, _Upstream | None] = {}
        self._waiters: deque[tuple[_Upstream, asyncio.Future[_Channel | None]]] = deque()
        self._busy: set[_Channel] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def upstream(self, base: str) -> _Upstream | None:
        """The backend at base URL ``base``, or ``None`` when the router's own client cannot reach it."""
        try:
            return self._upstreams[base]
        except KeyError:
            pass
        if len(self._upstreams) >= 4096:  # base URLs of members long gone: start afresh
            self._upstreams = {b: u for b, u in self._upstreams.items() if u is not None and u.idle}
        found = self._upstreams[base] = _upstream(base)
        return found

    def idle(self) -> int:
        """How many idle connections the pool keeps."""
        return sum(len(u.idle) for u in self._upstreams.values() if u is not None)

    async def acquire(self, upstream: _Upstream, deadline: float, *, fresh: bool = False) -> _Channel:
        """A connection to ``upstream`` whose exchange must end by ``deadline`` (event-loop clock): an
        idle one (unless ``fresh``), else a new one once the limit allows. Raises ``TimeoutError`` when
        none is had by the deadline, ``OSError`` when the backend cannot be reached."""
        if not fresh:
            idle = self.take(upstream, deadline)
            if idle is not None:
                return idle
        if self._closed:
            raise _UpstreamError("the router is closing")
        async with asyncio.timeout_at(deadline):
            channel = await self._open(upstream)
        self.watch(channel, deadline)
        return channel

    def take(self, upstream: _Upstream, deadline: float) -> _Channel | None:
        """An idle connection to ``upstream`` (watched until ``deadline``), or ``None`` if none is left:
        :meth:`acquire` without a coroutine, for the usual case."""
        now = self.loop.time()
        while upstream.idle:
            channel = upstream.idle.pop()
            if not (channel.eof or channel.buffer) and now - channel.idle_since < _IDLE_SECONDS:
                self.watch(channel, deadline)
                return channel
            channel.close()
        return None

    def watch(self, channel: _Channel, deadline: float) -> None:
        """Expire ``channel``'s exchange at ``deadline`` (within a tick), until it is released."""
        channel.deadline = deadline
        channel.expired = False
        self._busy.add(channel)
        if self._sweeper is None:
            self._sweeper = self.loop.call_at(self.loop.time() + self.tick, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for channel in [c for c in self._busy if c.deadline <= now]:
            self._busy.discard(channel)
            channel.expire()
        self._sweeper = self.loop.call_at(now + self.tick, self._sweep) if self._busy else None

    async def _open(self, upstream: _Upstream) -> _Channel:
        """A new connection to ``upstream``, once fewer than ``limit`` are open (or one handed over)."""
        while self.open >= self.limit:
            if self._evict():
                continue
            waiter: asyncio.Future[_Channel | None] = self.loop.create_future()
            entry = (upstream, waiter)
            self._waiters.append(entry)
            try:
                handed = await waiter
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                elif waiter.done() and not waiter.cancelled():
                    given = waiter.result()
                    if given is not None:  # a connection was handed over as this request gave up
                        self.release(given, reusable=True)
                    else:
                        self._wake()  # pass the free place on
                raise
            if handed is not None:
                return handed
        self.open += 1
        made: list[_Channel] = []

        def protocol() -> _Channel:
            made.append(_Channel(self, upstream))
            return made[-1]

        try:
            await self.loop.create_connection(protocol, upstream.host, upstream.port)
        except BaseException:
            if made:
                made[0].close()
            else:
                self.open -= 1
                self._wake()
            raise
        return made[0]

    def release(self, channel: _Channel, *, reusable: bool) -> None:
        """Take ``channel`` back after an exchange: keep it for the next (when ``reusable``) or close it."""
        self._busy.discard(channel)
        if not reusable or channel.closed or self._closed:
            channel.close()
            return
        channel.used = True
        upstream = channel.upstream
        if self._waiters:
            for entry in self._waiters:
                if entry[0] is upstream and not entry[1].done():
                    self._waiters.remove(entry)
                    entry[1].set_result(channel)
                    return
            channel.close()  # its place goes to a request waiting for another backend
            return
        now = channel.idle_since = self.loop.time()
        idle = upstream.idle
        while idle and now - idle[0].idle_since >= _IDLE_SECONDS:
            idle[0].close()
        idle.append(channel)

    def forget(self, channel: _Channel) -> None:
        """``channel`` closed: it no longer counts against the limit nor waits idle."""
        self.open -= 1
        self._busy.discard(channel)
        idle = channel.upstream.idle
        if channel in idle:
            idle.remove(channel)
        self._wake()

    def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for upstream in self._upstreams.values():
            if upstream is not None:
                for channel in list(upstream.idle):
                    channel.close()
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_UpstreamError("the router is closing"))

    def _evict(self) -> bool:
        """Close the oldest idle connection to any backend, to free a place; ``False`` if none is idle."""
        for upstream in self._upstreams.values():
            if upstream is not None and upstream.idle:
                upstream.idle[0].close()
                return True
        return False

    def _wake(self) -> None:
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class RingRouter:
    """Routes requests to the owner of their key; see the module documentation.

    Exactly one of ``node`` (ownership from the ring) and ``balancer`` (ownership from bounded-load
    hashing over backend addresses, with requests in flight as the load) must be given.

    :param node: a ring node; the owner of a key is ``node.lookup(key).owner.address``.
    :param load_factor: with ``node``: balance over the ring's live members instead, with requests in
        flight as the load and this load factor (any form :func:`~balancer.bounded.parse_load_factor`
        reads); see :attr:`members`. ``None``: route to the key's owner.
    :param balancer: a balancer whose node names are backend addresses (``host:port``).
    :param local: this server's own address among the owners (a ring node's address by default); a
        request it owns is handled here. ``None`` with a balancer: every request is forwarded.
    :param key: derives the routing key from a request; ``None`` means handle locally.
    :param backend_url: the base URL of an owner's application, from its address (``http://{address}``).
    :param mode: ``"proxy"`` forwards the request; ``"redirect"`` answers 307 to the owner.
    :param timeout: seconds a forwarded request may take in all.
    :param max_hops: forwards allowed before a request is refused with 508.
    :param connections: most connections open to all owners together, by each of the router's two
        clients: its own keep-alive connections for requests without a body or with a small one of known
        length, and aiohttp's client for requests whose body streams.
    :param secret: shared by the routers that forward to each other; proves a forward (see the module
        documentation). By default a ring node's cluster secret (or the key derived from its API token);
        ``None`` with a balancer: every server re-balances what it receives.
    :param max_skew: seconds a forward's proof stays good (the routers' clocks may differ this much).
    """

    def __init__(
        self,
        *,
        node: Node | None = None,
        load_factor: float | str | Fraction | None = None,
        balancer: BoundedLoadBalancer | None = None,
        local: str | None = None,
        key: Callable[[web.Request], str | None] = default_key,
        backend_url: Callable[[str], str] = _http_url,
        mode: Literal["proxy", "redirect"] = "proxy",
        timeout: float = 30.0,
        max_hops: int = 2,
        connections: int = 256,
        secret: str | None = None,
        max_skew: float = 60.0,
    ) -> None:
        check_router(node, balancer, max_hops=max_hops, timeout=timeout, load_factor=load_factor, mode=mode)
        self.node = node
        self.balancer = balancer
        self.members = (
            MemberBalancer(node, load_factor=load_factor)
            if node is not None and load_factor is not None
            else None
        )
        """With ``node`` and ``load_factor``: the balancer over the ring's live members, else ``None``."""
        self.local = local
        self.key = key
        self.backend_url = backend_url
        self.mode = mode
        self.timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_hops = max_hops
        self.connections = connections
        self.secret = forward_secret(node, secret)
        self.max_skew = max_skew
        self._session: aiohttp.ClientSession | None = None
        self._pool: _Pool | None = None

    async def owner(self, key: str) -> str:
        """The address of the node that owns ``key`` now (for a balancer: without counting a load)."""
        balancer = self._balancer()
        if balancer is not None:
            return balancer.peek(key)
        assert self.node is not None
        return (await self.node.lookup(key)).owner.address

    def _balancer(self) -> BoundedLoadBalancer | None:
        """The balancer that decides now: the static one, or the members' once the node has a view."""
        if self.members is not None and len(self.members.balancer):
            return self.members.balancer
        return self.balancer

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """``app.cleanup_ctx`` entry: the clients to the owners for the application's life, and with
        ``load_factor`` the members' balancer following the node's membership events meanwhile."""
        if self.members is not None:
            self.members.start()
        try:
            connector = aiohttp.TCPConnector(limit=self.connections)
            # no cookie jar: a Set-Cookie from one owner must never ride along on other clients' requests
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )
            self._pool = _Pool(self.connections, tick=min(1.0, max(0.01, self.timeout / 10)))
            try:
                yield
            finally:
                pool, self._pool = self._pool, None
                pool.close()
                session, self._session = self._session, None
                await session.close()
        finally:
            if self.members is not None:
                self.members.stop()

    @property
    def middleware(self) -> Middleware:
        """The aiohttp middleware to install (:func:`setup_routing` does it)."""

        @web.middleware
        async def route(request: web.Request, handler: WebHandler) -> web.StreamResponse:
            key = self.key(request)
            if key is None:
                return await handler(request)
            try:
                hops_done = parse_hops(request.headers.get(HOPS_HEADER))
            except BadRequestError as exc:
                return _error(400, "BadRequestError", str(exc))
            local = self.local if self.local is not None or self.node is None else self.node.address
            balancer = self._balancer()
            if balancer is not None:
                if hops_done and local is not None and self._proven(request, hops_done, local):
                    # the server that forwarded it chose this one, counting the load there: serve it
                    return await handler(request)
                return await self._balanced(request, handler, balancer, key, local, hops_done)
            try:
                owner = await self.owner(key)
            except BalancerError as exc:
                return _error(503, type(exc).__name__, f"no owner found for {key!r}: {exc}")
            if owner == local:
                return await handler(request)
            return await self._send(request, owner, hops_done)

        return route

    def _proven(self, request: web.Request, hops: int, local: str) -> bool:
        """Whether a router sharing the secret forwarded ``request`` to ``local`` with this hop count,
        lately."""
        if self.secret is None:
            return False
        value = request.headers.get(FORWARDED_HEADER, "")
        return forward_is_proven(
            self.secret, value, hops, request.method, local, request.rel_url.path_qs, self.max_skew
        )

    async def _balanced(
        self,
        request: web.Request,
        handler: WebHandler,
        balancer: BoundedLoadBalancer,
        key: str,
        local: str | None,
        hops: int,
    ) -> web.StreamResponse:
        try:
            lease = Lease(key, balancer.acquire(key))
        except CapacityError as exc:
            return _error(503, "CapacityError", str(exc))
        except BalancerError as exc:
            return _error(503, type(exc).__name__, str(exc))
        try:  # the load is released on every way out: success, error, cancellation
            if lease.node == local:
                return await handler(request)
            return await self._send(request, lease.node, hops)
        finally:
            _release(balancer, lease)

    async def _send(self, request: web.Request, owner: str, hops: int) -> web.StreamResponse:
        base = self.backend_url(owner)
        # the target as the client sent it, still percent-encoded: decoding it could change its meaning
        target = request.rel_url.raw_path_qs
        if self.mode == "redirect":
            return web.Response(status=307, headers={"Location": base + target})
        if hops >= self.max_hops:
            return _error(508, "LoopDetected", f"request forwarded {hops} times already; not passing it on")
        if self._session is None or self._pool is None:
            raise RuntimeError("the router is not started: install it with setup_routing(app, ...)")
        named = _named(request.headers.get("Connection"))
        added = self._added_headers(request, owner, hops, named)
        upstream = self._pool.upstream(base)
        if upstream is not None and _sized(request):
            return await self._exchange(request, owner, upstream, target, named, added)
        dropped = _NOT_PASSED | named if named else _NOT_PASSED
        passed = [(k, v) for k, v in request.headers.items() if k.lower() not in dropped]
        return await self._stream(request, owner, base + target, passed + added)

    def _added_headers(
        self, request: web.Request, owner: str, hops: int, named: frozenset[str]
    ) -> list[tuple[str, str]]:
        """The headers a forward of ``request`` to ``owner`` writes itself: the hop count, the proof
        (with a secret) and the ``X-Forwarded-`` pair. ``named``: what the request's ``Connection`` lists."""
        headers = [(HOPS_HEADER, str(hops + 1))]
        if self.secret is not None:
            proof = prove_forward(self.secret, hops + 1, request.method, owner, request.rel_url.path_qs)
            headers.append((FORWARDED_HEADER, proof))
        before = None if "x-forwarded-for" in named else request.headers.get("X-Forwarded-For")
        headers.append(("X-Forwarded-For", ", ".join(filter(None, [before, request.remote]))))
        headers.append(("X-Forwarded-Host", request.host))
        return headers

    async def _exchange(
        self,
        request: web.Request,
        owner: str,
        upstream: _Upstream,
        target: str,
        named: frozenset[str],
        added: list[tuple[str, str]],
    ) -> web.StreamResponse:
        """Forward ``request`` (no body, or a small one of known length) over the router's own
        connections; the answer comes back in one piece when it is small and sized, else streamed.
        ``named`` and ``added`` as for :meth:`_added_headers`."""
        assert self._pool is not None
        pool = self._pool
        method = request.method
        try:
            body = (
                await request.content.readexactly(request.content_length or 0) if request.body_exists else b""
            )
        except asyncio.IncompleteReadError:
            return _error(400, "BadRequestError", "the request's body ended before its Content-Length")
        # the client's headers as they came (bytes: nothing to decode and encode again)
        dropped = _NOT_PASSED_RAW | {n.encode() for n in named} if named else _NOT_PASSED_RAW
        parts = [f"{method} {target} HTTP/1.1\r\nHost: {upstream.authority}\r\n".encode()]
        lines = 2 + len(added)
        for name, value in request.raw_headers:
            if name.lower() not in dropped:
                parts += (name, b": ", value, b"\r\n")
                lines += 1
        parts.append("".join([f"{k}: {v}\r\n" for k, v in added]).encode("utf-8", "surrogateescape"))
        parts.append(b"\r\n")
        head = b"".join(parts)
        # the parser let no line break into a header nor a space into the target; never send one that did
        if head.count(b"\n") != lines + 1 or head.count(b"\r") != lines + 1 or " " in target:
            return _error(400, "BadRequestError", "the request's head cannot be forwarded as it is")
        data = head + body if body else head
        channel: _Channel | None = None
        streamed: web.StreamResponse | None = None
        deadline = pool.loop.time() + self.timeout
        try:
            channel = pool.take(upstream, deadline) or await pool.acquire(upstream, deadline)
            try:
                channel.send(data)
                answer = await channel.read_answer(method)
            except _StaleConnectionError:
                if method not in _IDEMPOTENT:
                    raise
                # the backend closed the idle connection as the request went out: once more, afresh
                channel.close()
                channel = None
                channel = await pool.acquire(upstream, deadline, fresh=True)
                channel.send(data)
                answer = await channel.read_answer(method)
            if answer.length is not None and answer.length <= _BUFFERED:
                payload = await channel.read_exactly(answer.length) if answer.length else b""
                pool.release(channel, reusable=channel.reusable(answer))
                channel = None
                return web.Response(
                    status=answer.status, reason=answer.reason, body=payload, headers=answer.headers
                )
            streamed = web.StreamResponse(status=answer.status, reason=answer.reason)
            streamed.headers.extend(answer.headers)
            await streamed.prepare(request)
            await channel.copy_body(answer, streamed.write)
            pool.release(channel, reusable=channel.reusable(answer))
            channel = None
            await streamed.write_eof()
            return streamed
        except TimeoutError:
            return self._gateway_timeout(request, owner, streamed)
        except (_UpstreamError, OSError) as exc:
            return self._bad_gateway(request, owner, exc, streamed)
        finally:
            if channel is not None:  # abandoned mid-exchange (error, timeout, cancellation): never reused
                channel.close()

    async def _stream(
        self, request: web.Request, owner: str, url: str, headers: list[tuple[str, str]]
    ) -> web.StreamResponse:
        """Forward ``request`` with aiohttp's client, its body streamed as it arrives."""
        assert self._session is not None
        body = request.content if request.body_exists else None
        streamed: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=self._client_timeout,
                # a proxy passes on what the client sent: aiohttp adds none of its defaults, as the
                # router's own client does not (an Accept-Encoding added here would bring the client
                # a compressed body it never asked for)
                skip_auto_headers=_NO_AUTO_HEADERS,
            ) as upstream:
                passed = _forwardable(upstream.headers)
                size = upstream.content_length
                if size is not None and size <= _BUFFERED:
                    # small and sized: one response, one write, instead of headers and body apart
                    payload = await upstream.read()
                    return web.Response(
                        status=upstream.status, reason=upstream.reason, body=payload, headers=passed
                    )
                streamed = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                streamed.headers.extend(passed)
                await streamed.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await streamed.write(chunk)
                await streamed.write_eof()
                return streamed
        except TimeoutError:
            return self._gateway_timeout(request, owner, streamed)
        except (aiohttp.ClientError, OSError) as exc:
            return self._bad_gateway(request, owner, exc, streamed)

    def _gateway_timeout(
        self, request: web.Request, owner: str, streamed: web.StreamResponse | None
    ) -> web.StreamResponse:
        log.info("forwarding to %s timed out after %g s", owner, self.timeout)
        if streamed is not None:
            return _abandon(request, streamed)
        return _error(504, "GatewayTimeout", f"the owner {owner} did not answer within {self.timeout:g} s")

    def _bad_gateway(
        self, request: web.Request, owner: str, exc: BaseException, streamed: web.StreamResponse | None
    ) -> web.StreamResponse:
        log.info("forwarding to %s failed: %s", owner, exc)
        if streamed is not None:
            return _abandon(request, streamed)
        return _error(502, "BadGateway", f"the owner {owner} cannot be reached: {exc or type(exc).__name__}")


def _sized(request: web.Request) -> bool:
    """Whether ``request`` goes over the router's own connections: no body, or one of known length up to
    :data:`_BUFFERED` bytes, and no ``Expect`` (aiohttp's client deals with 100-continue)."""
    headers = request.headers
    if "Expect" in headers:
        return False
    if not request.body_exists:
        return True
    length = request.content_length
    return length is not None and length <= _BUFFERED and "Transfer-Encoding" not in headers


def _abandon(request: web.Request, streamed: web.StreamResponse) -> web.StreamResponse:
    """Cut the client's connection under an answer whose head has gone out, so the client sees the body
    end early (and never a closing chunk that would make a truncated body look whole)."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return streamed


ROUTER = web.AppKey("balancer_router", RingRouter)
"""Where :func:`setup_routing` keeps the application's router."""


def setup_routing(app: web.Application, **options: Any) -> RingRouter:
    """Route ``app``'s requests to their owners: install a :class:`RingRouter` built from ``options``.

    Call before the application starts. Returns the router (also at ``app[ROUTER]``).
    """
    router = RingRouter(**options)
    app[ROUTER] = router
    app.middlewares.append(router.middleware)
    app.cleanup_ctx.append(router.lifecycle)
    return router


class _BalancedRequest:
    """The async context manager :meth:`BalancedSession.request` returns."""

    def __init__(
        self, session: BalancedSession, method: str, path: str, key: str, kwargs: dict[str, Any]
    ) -> None:
        self._session = session
        self._args = (method, path, key)
        self._kwargs = kwargs
        self._lease: Lease | None = None
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        method, path, key = self._args
        owner = self._session
        balancer = owner.balancer
        if owner.members is not None and not len(balancer):
            # the node has no view yet: the key's owner, as the ring says (RingError before it starts)
            address = (await owner.members.node.lookup(key)).owner.address
            self._response = await owner.session.request(
                method, owner.backend_url(address) + path, **self._kwargs
            )
            return self._response
        failed: list[str] = []
        last: BaseException | None = None
        for _ in range(owner.retries + 1):
            try:
                lease = Lease(key, balancer.acquire(key, exclude=failed))
            except CapacityError:  # every backend not yet tried is full, or none is left
                break
            try:
                url = owner.backend_url(lease.node) + path
                response = await owner.session.request(method, url, **self._kwargs)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                _release(balancer, lease)
                failed.append(lease.node)
                last = exc
                continue
            except BaseException:
                _release(balancer, lease)
                raise
            if response.status in owner.retry_statuses and len(failed) < owner.retries:
                response.release()
                _release(balancer, lease)
                failed.append(lease.node)
                continue
            self._lease, self._response = lease, response
            return response
        raise aiohttp.ClientConnectionError(f"every backend tried for {key!r} failed: {failed}; last: {last}")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._response is not None:
            self._response.release()
        if self._lease is not None:
            _release(self._session.balancer, self._lease)


class BalancedSession:
    """A client that sends each request to the backend that bounded-load hashing picks for its key.

    The backends are either ``backends``, base URLs (``http://10.0.0.1:8080``) optionally with weights,
    or the live members of the ring ``node`` sees, followed as they join and leave (see
    :class:`MemberBalancer`; until the node has a view, a request goes to its key's owner). Exactly one of
    the two must be given. A backend that refuses the connection or times out (or answers one of
    ``retry_statuses``) is skipped and the request retried on the key's next candidate, at most
    ``retries`` times. Each request holds one unit of load on its backend from sending until the
    ``async with`` block ends. An async context manager; :meth:`close` it to stop following the node.

    :param backend_url: the base URL of a backend from its name in the balancer: by default the name
        itself for ``backends``, and ``http://{address}`` for a member's address with ``node``.
    :param load_factor: the balancer's ``c``, in any form :func:`~balancer.bounded.parse_load_factor`
        reads.
    """

    def __init__(
        self,
        backends: Iterable[str] | Mapping[str, float] | None = None,
        *,
        node: Node | None = None,
        backend_url: Callable[[str], str] | None = None,
        load_factor: float | str | Fraction = DEFAULT_LOAD_FACTOR,
        retries: int = 2,
        retry_statuses: Collection[int] = (502, 503, 504),
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if (backends is None) == (node is None):
            raise ConfigError("give exactly one of backends= (static base URLs) and node= (a ring's members)")
        self.members = MemberBalancer(node, load_factor=load_factor) if node is not None else None
        """With ``node``: what follows the ring's live members (started on first use), else ``None``."""
        self.balancer = (
            self.members.balancer
            if self.members is not None
            else BoundedLoadBalancer(backends or (), load_factor=load_factor)
        )
        """The balancer that picks backends; its node names go through :attr:`backend_url`."""
        self.backend_url = backend_url or (_http_url if node is not None else str)
        """Maps a balancer node name to its base URL."""
        self.retries = retries
        self.retry_statuses = frozenset(retry_statuses)
        self._own_session = session is None
        self._session = session

    @property
    def session(self) -> aiohttp.ClientSession:
        """The underlying aiohttp session (created on first use)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def request(self, method: str, path: str, *, key: str, **kwargs: Any) -> _BalancedRequest:
        """``async with session.request("GET", "/users/42", key="42") as response: ...``"""
        if self.members is not None:
            self.members.start()
        return _BalancedRequest(self, method, path, key, kwargs)

    def get(self, path: str, *, key: str, **kwargs: Any) -> _BalancedRequest:
        """A balanced GET."""
        return self.request("GET", path, key=key, **kwargs)

    def post(self, path: str, *, key: str, **kwargs: Any) -> _BalancedRequest:
        """A balanced POST."""
        return self.request("POST", path, key=key, **kwargs)

    async def close(self) -> None:
        """Stop following the node's members, and close the underlying session if this object made it."""
        if self.members is not None:
            self.members.stop()
        if self._own_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        if self.members is not None:
            self.members.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
