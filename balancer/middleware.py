"""aiohttp middleware that routes each request to the owner of its key, and a balanced client session.

Server side: :func:`setup_routing` puts a :class:`RingRouter` in front of an aiohttp application. For every
request it derives a routing key (by default the ``key`` path parameter, else the ``X-Balancer-Key``
header); requests without a key are handled locally. The key's owner comes from a running ring
:class:`~balancer.node.Node` or from a :class:`~balancer.bounded.BoundedLoadBalancer` over a static list of
backends, where the load is the number of requests in flight. If the owner is this server the request is
handled here; otherwise it is proxied to the owner (bodies streamed both ways, hop-by-hop headers
stripped) or, in ``"redirect"`` mode, answered with 307 to the owner.

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

import contextlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict

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
    "KEY_HEADER",
    "ROUTER",
    "BalancedSession",
    "MemberBalancer",
    "RingRouter",
    "default_key",
    "setup_routing",
]

log = logging.getLogger(__name__)

KEY_HEADER = "X-Balancer-Key"
"""Header a client may set to name the routing key when the path has none."""
HOPS_HEADER = "X-Balancer-Hops"
"""How many times a request has been forwarded already (the loop guard)."""
FORWARDED_HEADER = "X-Balancer-Forwarded"
"""``<timestamp ms>:<HMAC>``: proves a router sharing the secret forwarded the request with its hop count."""

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
_HOP_BY_HOP = frozenset(
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


_BUFFERED = 1 << 16  # upstream bodies up to this size (with a Content-Length) are sent back in one piece


def default_key(request: web.Request) -> str | None:
    """The ``key`` path parameter, else the ``X-Balancer-Key`` header, else None (handled locally)."""
    return request.match_info.get("key") or request.headers.get(KEY_HEADER)


def _forwardable(headers: Mapping[str, str]) -> CIMultiDict[str]:
    named = {v.strip().lower() for v in headers.get("Connection", "").split(",") if v.strip()}
    dropped = _HOP_BY_HOP | named if named else _HOP_BY_HOP
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in dropped)


def _forward_proof(secret: str, hops: int, method: str, owner: str, path_qs: str, timestamp: str) -> str:
    """The HMAC of a forward, signed the way ring RPCs are: the hop count stands in the nonce's place and
    the path in the body's."""
    return sign(secret, method, owner, timestamp, f"hops {hops}", path_qs.encode("utf-8", "surrogatepass"))


def _hops(request: web.Request) -> int:
    """The request's hop count; raises :class:`BadRequestError` unless it is a small decimal number."""
    given = request.headers.get(HOPS_HEADER)
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
    with contextlib.suppress(BalancerError):
        balancer.release(lease)


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
    :param connections: most connections open to all owners together.
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
        if (node is None) == (balancer is None):
            raise ConfigError("give exactly one of node= (ring ownership) and balancer= (static backends)")
        if load_factor is not None and node is None:
            raise ConfigError("load_factor= balances over a ring node's members: give it with node=")
        if mode not in ("proxy", "redirect"):
            raise ConfigError(f"mode must be 'proxy' or 'redirect', got {mode!r}")
        if max_hops < 1:
            raise ConfigError("max_hops must be at least 1")
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
        self.max_hops = max_hops
        self.connections = connections
        if secret is None and node is not None:
            secret = rpc_secret(node.config.cluster_secret, node.config.api_token)
        self.secret = secret
        self.max_skew = max_skew
        self._session: aiohttp.ClientSession | None = None

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
        """``app.cleanup_ctx`` entry: one client session for the application's life, and with
        ``load_factor`` the members' balancer following the node's membership events meanwhile."""
        if self.members is not None:
            self.members.start()
        try:
            connector = aiohttp.TCPConnector(limit=self.connections)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            try:
                yield
            finally:
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
                hops_done = _hops(request)
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
        timestamp, _, proof = request.headers.get(FORWARDED_HEADER, "").partition(":")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16 and proof.isascii()):
            return False
        if abs(time.time() - int(timestamp) / 1000) > self.max_skew:
            return False
        expected = _forward_proof(
            self.secret, hops, request.method, local, request.rel_url.path_qs, timestamp
        )
        return hmac.compare_digest(expected, proof)

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
        target = self.backend_url(owner) + request.rel_url.path_qs
        if self.mode == "redirect":
            return web.Response(status=307, headers={"Location": target})
        if hops >= self.max_hops:
            return _error(508, "LoopDetected", f"request forwarded {hops} times already; not passing it on")
        if self._session is None:
            raise RuntimeError("the router is not started: install it with setup_routing(app, ...)")
        headers = _forwardable(request.headers)
        headers[HOPS_HEADER] = str(hops + 1)
        headers.popall(FORWARDED_HEADER, None)
        if self.secret is not None:
            timestamp = str(int(time.time() * 1000))
            proof = _forward_proof(
                self.secret, hops + 1, request.method, owner, request.rel_url.path_qs, timestamp
            )
            headers[FORWARDED_HEADER] = f"{timestamp}:{proof}"
        headers["X-Forwarded-For"] = ", ".join(filter(None, [headers.get("X-Forwarded-For"), request.remote]))
        headers["X-Forwarded-Host"] = request.host
        body = request.content if request.body_exists else None
        try:
            async with self._session.request(
                request.method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as upstream:
                headers = _forwardable(upstream.headers)
                size = upstream.content_length
                if size is not None and size <= _BUFFERED:
                    # small and sized: one response, one write, instead of headers and body apart
                    payload = await upstream.read()
                    return web.Response(
                        status=upstream.status, reason=upstream.reason, body=payload, headers=headers
                    )
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                response.headers.update(headers)
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except TimeoutError:
            return _error(
                504, "GatewayTimeout", f"the owner {owner} did not answer within {self.timeout:g} s"
            )
        except (aiohttp.ClientError, OSError) as exc:
            log.info("forwarding to %s failed: %s", owner, exc)
            return _error(
                502, "BadGateway", f"the owner {owner} cannot be reached: {exc or type(exc).__name__}"
            )


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
