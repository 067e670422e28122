"""aiohttp middleware that routes each request to the owner of its key, and a balanced client session.

Server side: :func:`setup_routing` puts a :class:`RingRouter` in front of an aiohttp application. For every
request it derives a routing key (by default the ``key`` path parameter, else the ``X-Balancer-Key``
header); requests without a key are handled locally. The key's owner comes from a running ring
:class:`~balancer.node.Node` or from a :class:`~balancer.bounded.BoundedLoadBalancer` over a static list of
backends, where the load is the number of requests in flight. If the owner is this server the request is
handled here; otherwise it is proxied to the owner (bodies streamed both ways, hop-by-hop headers
stripped) or, in ``"redirect"`` mode, answered with 307 to the owner.

Every forwarded request carries ``X-Balancer-Hops``. With a ring, a receiver whose view names another
owner forwards again, but a request already forwarded ``max_hops`` times is refused with 508, so two servers
that disagree about an owner cannot bounce a request forever. With a balancer, the server that forwards a
request has made the choice (and counts its load), so the receiver serves it, but only if the forward is
proven: routers sharing a secret (``secret=``, or a ring node's cluster secret) add ``X-Balancer-Forwarded``,
an HMAC over the hop count, method, destination, path and a timestamp. A hop count a client wrote itself
is only counted for the loop guard and never makes a server skip routing; one that is not a small decimal
number gets 400. An owner that cannot be
reached gives 502, one that does not answer in time 504, both with a JSON error saying which.

Client side: :class:`BalancedSession` sends each request to the backend chosen by bounded-load consistent
hashing of its key, and retries on the key's next candidate when a backend fails.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
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
from balancer.bounded import BoundedLoadBalancer, Lease
from balancer.errors import BadRequestError, BalancerError, CapacityError, ConfigError

if TYPE_CHECKING:
    from balancer.node import Node

__all__ = [
    "FORWARDED_HEADER",
    "HOPS_HEADER",
    "KEY_HEADER",
    "ROUTER",
    "BalancedSession",
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


class RingRouter:
    """Routes requests to the owner of their key; see the module documentation.

    Exactly one of ``node`` (ownership from the ring) and ``balancer`` (ownership from bounded-load
    hashing over backend addresses, with requests in flight as the load) must be given.

    :param node: a started ring node; the owner of a key is ``node.lookup(key).owner.address``.
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
        balancer: BoundedLoadBalancer | None = None,
        local: str | None = None,
        key: Callable[[web.Request], str | None] = default_key,
        backend_url: Callable[[str], str] = lambda address: f"http://{address}",
        mode: Literal["proxy", "redirect"] = "proxy",
        timeout: float = 30.0,
        max_hops: int = 2,
        connections: int = 256,
        secret: str | None = None,
        max_skew: float = 60.0,
    ) -> None:
        if (node is None) == (balancer is None):
            raise ConfigError("give exactly one of node= (ring ownership) and balancer= (static backends)")
        if mode not in ("proxy", "redirect"):
            raise ConfigError(f"mode must be 'proxy' or 'redirect', got {mode!r}")
        if max_hops < 1:
            raise ConfigError("max_hops must be at least 1")
        self.node = node
        self.balancer = balancer
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
        if self.node is not None:
            return (await self.node.lookup(key)).owner.address
        assert self.balancer is not None
        return self.balancer.peek(key)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """``app.cleanup_ctx`` entry: one client session for the application's life."""
        connector = aiohttp.TCPConnector(limit=self.connections)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        try:
            yield
        finally:
            session, self._session = self._session, None
            await session.close()

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
            if self.balancer is not None:
                if hops_done and self.local is not None and self._proven(request, hops_done):
                    # the server that forwarded it chose this one, counting the load there: serve it
                    return await handler(request)
                return await self._balanced(request, handler, key, local, hops_done)
            try:
                owner = await self.owner(key)
            except BalancerError as exc:
                return _error(503, type(exc).__name__, f"no owner found for {key!r}: {exc}")
            if owner == local:
                return await handler(request)
            return await self._send(request, owner, hops_done)

        return route

    def _proven(self, request: web.Request, hops: int) -> bool:
        """Whether a router sharing the secret forwarded ``request`` here with this hop count, lately."""
        if self.secret is None or self.local is None:
            return False
        timestamp, _, proof = request.headers.get(FORWARDED_HEADER, "").partition(":")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16 and proof.isascii()):
            return False
        if abs(time.time() - int(timestamp) / 1000) > self.max_skew:
            return False
        expected = _forward_proof(
            self.secret, hops, request.method, self.local, request.rel_url.path_qs, timestamp
        )
        return hmac.compare_digest(expected, proof)

    async def _balanced(
        self, request: web.Request, handler: WebHandler, key: str, local: str | None, hops: int
    ) -> web.StreamResponse:
        assert self.balancer is not None
        try:
            lease = Lease(key, self.balancer.acquire(key))
        except CapacityError as exc:
            return _error(503, "CapacityError", str(exc))
        except BalancerError as exc:
            return _error(503, type(exc).__name__, str(exc))
        try:  # the load is released on every way out: success, error, cancellation
            if lease.node == local:
                return await handler(request)
            return await self._send(request, lease.node, hops)
        finally:
            with contextlib.suppress(BalancerError):
                self.balancer.release(lease)

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
        failed: list[str] = []
        last: BaseException | None = None
        for _ in range(owner.retries + 1):
            try:
                lease = Lease(key, owner.balancer.acquire(key, exclude=failed))
            except CapacityError:  # every backend not yet tried is full, or none is left
                break
            try:
                response = await owner.session.request(method, lease.node + path, **self._kwargs)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                owner.balancer.release(lease)
                failed.append(lease.node)
                last = exc
                continue
            except BaseException:
                owner.balancer.release(lease)
                raise
            if response.status in owner.retry_statuses and len(failed) < owner.retries:
                response.release()
                owner.balancer.release(lease)
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
            self._session.balancer.release(self._lease)


class BalancedSession:
    """A client that sends each request to the backend that bounded-load hashing picks for its key.

    ``backends`` are base URLs (``http://10.0.0.1:8080``), optionally with weights. A backend that
    refuses the connection or times out (or answers one of ``retry_statuses``) is skipped and the
    request retried on the key's next candidate, at most ``retries`` times. Each request holds one unit
    of load on its backend from sending until the ``async with`` block ends. An async context manager.
    """

    def __init__(
        self,
        backends: Iterable[str] | Mapping[str, float],
        *,
        load_factor: float = 1.25,
        retries: int = 2,
        retry_statuses: Collection[int] = (502, 503, 504),
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.balancer = BoundedLoadBalancer(backends, load_factor=load_factor)
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
        return _BalancedRequest(self, method, path, key, kwargs)

    def get(self, path: str, *, key: str, **kwargs: Any) -> _BalancedRequest:
        """A balanced GET."""
        return self.request("GET", path, key=key, **kwargs)

    def post(self, path: str, *, key: str, **kwargs: Any) -> _BalancedRequest:
        """A balanced POST."""
        return self.request("POST", path, key=key, **kwargs)

    async def close(self) -> None:
        """Close the underlying session if this object made it."""
        if self._own_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
