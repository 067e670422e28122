"""balancer_asgi: an ASGI middleware that routes each request to the owner of its key.

The ASGI counterpart of :mod:`balancer.middleware`'s aiohttp router, for any ASGI 3 application (FastAPI,
Starlette, Quart, a bare callable) under any ASGI server (uvicorn, hypercorn): wrap the application,

    app = RoutingMiddleware(api, balancer=BoundedLoadBalancer(BACKENDS), local=ME, paths=["/users/{key}/..."])

or, in Starlette and FastAPI, ``api.add_middleware(RoutingMiddleware, balancer=..., ...)``.

Each HTTP request's routing key comes from the path (templates or regular expressions with a ``key``
group, ``paths=``), else from the ``X-Balancer-Key`` header (``header=``), or from any function of the
ASGI scope (``key=``); a request without a key is served by the wrapped application. The key's owner comes
from a :class:`~balancer.bounded.BoundedLoadBalancer` over backend addresses (``balancer=``; the load is
requests in flight, held from when forwarding starts until the exchange ends, however it ends) or from a
running ring :class:`~balancer.node.Node` (``node=``, ``await node.lookup(key)``, with ``backend_url=``
mapping a member's ring address to its application's URL). If the owner is this server (``local=``) the
wrapped application serves the request; otherwise it is proxied to the owner, bodies streamed both ways
and hop-by-hop headers stripped, or in ``mode="redirect"`` answered with 307 to the owner.

The loop guard and the proof of a forward are :mod:`balancer.middleware`'s own, through its public helpers
(:func:`~balancer.middleware.parse_hops`, :func:`~balancer.middleware.prove_forward`,
:func:`~balancer.middleware.forward_is_proven`, :func:`~balancer.middleware.proof_path`): forwards carry
``X-Balancer-Hops`` (digits only, else 400) and are refused with 508 past ``max_hops``; with a balancer,
a server serves what it was sent only under a valid ``X-Balancer-Forwarded`` HMAC made with the shared
``secret=``. So aiohttp and ASGI routers sharing a secret serve each other's forwards. Errors are the
aiohttp router's JSON bodies: 502 for an owner that cannot be reached, 504 for one that does not answer
within ``timeout=``, 508 for a loop, 400 for a malformed hop count, 503 when no owner can be found.

**Why aiohttp's client forwards the requests.** The package depends on balancer alone, and balancer
depends on aiohttp, so its client costs no new dependency. It streams request bodies from an async
iterator and answers chunk by chunk, keeps connections alive in a bounded pool (``connections=``), parses
HTTP/1.1 framing (chunked answers, keep-alive, interim answers) with a parser that sees heavy use, and
runs out of time by a total deadline per request. balancer.middleware's own keep-alive client
(``_Pool``) is faster for small requests, but it is private to that module and tied to aiohttp's server
objects; a second raw HTTP/1.1 client here would be a second parser to get right. The price is aiohttp's
per-request overhead, which ``benchmarks/asgi_router.py`` measures.

Differences from the aiohttp router, each for the ASGI setting: the upstream answer's ``Date`` and
``Server`` headers are not passed on, since ASGI servers write their own and a client would get both; an
answer that breaks after its head went out raises :class:`ForwardError`, which ASGI servers answer by
closing the client's connection (so the client sees a truncated body, never one that looks whole);
``websocket`` connections are not routed (the wrapped application gets them). The aiohttp router's
``load_factor=`` (balancing over a ring's live members) is not ported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import aiohttp
from yarl import URL

from balancer.bounded import BoundedLoadBalancer, Lease
from balancer.errors import BadRequestError, BalancerError, CapacityError, ConfigError
from balancer.middleware import (
    FORWARDED_HEADER,
    HOP_BY_HOP,
    HOPS_HEADER,
    KEY_HEADER,
    check_router,
    forward_is_proven,
    forward_secret,
    parse_hops,
    proof_path,
    prove_forward,
)

if TYPE_CHECKING:
    from balancer.node import Node

__all__ = [
    "ASGIApp",
    "ForwardError",
    "KeyFunction",
    "Message",
    "PathKey",
    "Receive",
    "RoutingMiddleware",
    "Scope",
    "Send",
    "compile_path",
]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""
Message = MutableMapping[str, Any]
"""An ASGI event, received or sent."""
Receive = Callable[[], Awaitable[Message]]
"""The ASGI ``receive`` callable."""
Send = Callable[[Message], Awaitable[None]]
"""The ASGI ``send`` callable."""
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application."""
KeyFunction = Callable[[Scope], str | None]
"""Derives a request's routing key from its scope; ``None``: the wrapped application serves it."""

_NOT_PASSED = HOP_BY_HOP | {
    h.lower() for h in (HOPS_HEADER, FORWARDED_HEADER, "X-Forwarded-For", "X-Forwarded-Host")
}
"""Request headers a forward never passes on: hop-by-hop ones, and the ones it writes itself."""
_NOT_RETURNED = HOP_BY_HOP | {"date", "server"}
"""Answer headers never passed back: hop-by-hop ones, and the two every ASGI server writes itself."""
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
"""Headers aiohttp's client would add on its own: a proxy passes on what the client sent, and no more."""
_BUFFERED = 1 << 16
"""An answer of known length up to this size goes back in one message; larger or unsized ones stream."""
_CHUNK = 1 << 16
"""Most bytes of an answer's body per message sent back while streaming."""
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""Methods a request may be sent again with (RFC 9110 section 9.2.2) when the owner closed a kept-alive
connection just as it went out."""
_HOPS_RAW = HOPS_HEADER.lower().encode()
_FORWARDED_RAW = FORWARDED_HEADER.lower().encode()


class ForwardError(Exception):
    """An owner's answer broke after its head had gone out to the client (the owner closed early, sent a
    malformed body or ran out of time). Raised out of the middleware, so that the ASGI server closes the
    client's connection: the client sees the body end early instead of one that looks whole."""


def compile_path(template: str | re.Pattern[str]) -> re.Pattern[str]:
    """The regular expression a path template stands for, matched against the whole decoded path.

    In a template, ``{name}`` matches one path segment (no ``/``), ``{name:path}`` the rest of the path,
    slashes included, and a final ``/...`` any further segments or none: ``"/users/{key}/..."`` matches
    ``/users/42``, ``/users/42/`` and ``/users/42/orders/7``. The template needs a ``{key}``. A compiled
    pattern is taken as it is: it must have a group named ``key`` and matches the path from its start
    (``re.match``: its end is free unless the pattern anchors it).

    Raises :class:`~balancer.errors.ConfigError` for a template or pattern without a ``key``.
    """
    if isinstance(template, re.Pattern):
        if "key" not in template.groupindex:
            raise ConfigError(f"the path pattern {template.pattern!r} has no group named 'key'")
        return template
    rest = template
    tail = ""
    if rest.endswith("/..."):
        rest, tail = rest[:-4], "(?:/.*)?"
    parts: list[str] = []
    position = 0
    names: set[str] = set()
    for field in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}", rest):
        name = field.group(1)
        if name in names:
            raise ConfigError(f"the path template {template!r} names {{{name}}} twice")
        names.add(name)
        parts.append(re.escape(rest[position : field.start()]))
        parts.append(f"(?P<{name}>.+)" if field.group(2) else f"(?P<{name}>[^/]+)")
        position = field.end()
    parts.append(re.escape(rest[position:]))
    if "key" not in names:
        raise ConfigError(f"the path template {template!r} has no {{key}}")
    return re.compile("".join(parts) + tail + r"\Z", re.DOTALL)


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase) in ``scope``, or ``None``."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _text(value: bytes | bytearray) -> str:
    """A header value as text, decoded as aiohttp's server decodes headers (so that routers agree)."""
    return value.decode("utf-8", "surrogateescape")


class PathKey:
    """The default routing key: the ``key`` group of the first of ``paths`` that matches the request's
    decoded path, else the value of the ``header`` (``X-Balancer-Key``; ``None``: no header), else
    ``None`` (the wrapped application serves the request).

    :param paths: path templates or compiled patterns, as :func:`compile_path` reads them.
    """

    def __init__(self, paths: Iterable[str | re.Pattern[str]] = (), header: str | None = KEY_HEADER) -> None:
        self.patterns = [compile_path(p) for p in paths]
        """The compiled ``paths``, tried in order."""
        self.header = header.lower().encode("latin-1") if header is not None else None
        """The header's name, lowercase, as ASGI scopes carry it."""

    def __call__(self, scope: Scope) -> str | None:
        """The routing key of the request ``scope`` describes, or ``None``."""
        path: str = scope["path"]
        for pattern in self.patterns:
            found = pattern.match(path)
            if found is not None and found.group("key"):
                return found.group("key")
        if self.header is not None:
            value = _header(scope, self.header)
            if value:
                return _text(value)
        return None


def _http_url(address: str) -> str:
    return f"http://{address}"


def _target(scope: Scope) -> str:
    """The request target as the client sent it, still percent-encoded (``/a%2Fb?q=1``)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(scope["path"], safe="/:@!$&'()*+,;=-._~%")
    query: bytes = scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _named(value: bytes | None) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists, lowercase (RFC 9110 section 7.6.1)."""
    if not value:
        return frozenset()
    return frozenset(t for t in (v.strip().lower() for v in value.split(b",")) if t)


def _error_body(kind: str, message: str) -> bytes:
    """The aiohttp router's JSON error, byte for byte."""
    return json.dumps(
        {"error": {"type": kind, "message": message}}, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


async def _answer(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _error(send: Send, status: int, kind: str, message: str) -> None:
    await _answer(send, status, _error_body(kind, message), [(b"content-type", b"application/json")])


def _release(balancer: BoundedLoadBalancer, lease: Lease) -> None:
    """Give ``lease`` back; a balancer whose last node left meanwhile has dropped it already."""
    try:
        balancer.release(lease)
    except BalancerError:
        log.debug("the lease %s was dropped with its node", lease)


class _ClientGone(Exception):
    """The client disconnected while its request's body was being passed on."""


class _RequestBody:
    """A request's body as aiohttp's client streams it up: the first piece, then each piece ASGI's
    ``receive`` gives, as it arrives."""

    def __init__(self, receive: Receive, first: bytes) -> None:
        self._receive = receive
        self._first = first
        self.done = False
        """Whether the body was read to its end."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        while not self.done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone("the client disconnected while sending its request's body")
            self.done = not message.get("more_body", False)
            if data := message.get("body", b""):
                yield data


class RoutingMiddleware:
    """An ASGI middleware that serves each request on the owner of its key; see the module documentation.

    Exactly one of ``node`` (ownership from the ring) and ``balancer`` (ownership from bounded-load
    hashing over backend addresses, with requests in flight as the load) must be given.

    :param app: the wrapped ASGI application, which serves what this server owns and what has no key.
    :param node: a running ring node; the owner of a key is ``(await node.lookup(key)).owner.address``.
    :param balancer: a balancer whose node names are backend addresses (``host:port``).
    :param local: this server's own address among the owners (a ring node's address by default); a
        request it owns is served by ``app``. ``None`` with a balancer: every keyed request is forwarded.
    :param paths: path templates or patterns the key is read from (see :func:`compile_path`).
    :param header: the header the key is read from when no path matches (``None``: none).
    :param key: derives the routing key from the ASGI scope instead of ``paths`` and ``header``.
    :param backend_url: the base URL of an owner's application, from its address (``http://{address}``).
    :param mode: ``"proxy"`` forwards the request; ``"redirect"`` answers 307 to the owner.
    :param timeout: seconds a forwarded request may take in all, its answer's body included.
    :param max_hops: forwards allowed before a request is refused with 508.
    :param connections: most connections open to all owners together.
    :param secret: shared by the routers that forward to each other, aiohttp's or ASGI ones; proves a
        forward. By default a ring node's cluster secret (or the key derived from its API token);
        ``None`` with a balancer: every server balances again what it receives.
    :param max_skew: seconds a forward's proof stays good (the routers' clocks may differ this much).

    One instance serves on one event loop. Its client to the owners is made on the first forward and
    closed when the server's lifespan ends (or by :meth:`aclose`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        node: Node | None = None,
        balancer: BoundedLoadBalancer | None = None,
        local: str | None = None,
        paths: Iterable[str | re.Pattern[str]] = (),
        header: str | None = KEY_HEADER,
        key: KeyFunction | None = None,
        backend_url: Callable[[str], str] = _http_url,
        mode: Literal["proxy", "redirect"] = "proxy",
        timeout: float = 30.0,
        max_hops: int = 2,
        connections: int = 256,
        secret: str | None = None,
        max_skew: float = 60.0,
    ) -> None:
        check_router(node, balancer, max_hops=max_hops, timeout=timeout, mode=mode)
        paths = list(paths)
        if key is not None and paths:
            raise ConfigError("give key= or paths=, not both: key= decides alone")
        self.app = app
        self.node = node
        self.balancer = balancer
        self.local = local
        self.key: KeyFunction = key if key is not None else PathKey(paths, header)
        """Derives the routing key from a request's scope."""
        self.backend_url = backend_url
        self.mode = mode
        self.timeout = timeout
        self.max_hops = max_hops
        self.connections = connections
        self.secret = forward_secret(node, secret)
        self.max_skew = max_skew
        self._client_timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route an HTTP request; pass the lifespan (closing the client at its end) and everything else
        on to the wrapped application."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            try:
                await self.app(scope, receive, send)
            finally:
                await self.aclose()
        else:
            await self.app(scope, receive, send)

    async def owner(self, key: str) -> str:
        """The address of the server that owns ``key`` now (for a balancer: without counting a load)."""
        if self.balancer is not None:
            return self.balancer.peek(key)
        assert self.node is not None
        return (await self.node.lookup(key)).owner.address

    async def aclose(self) -> None:
        """Close the client to the owners (a later forward makes a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.key(scope)
        if key is None:
            await self.app(scope, receive, send)
            return
        hops_value = _header(scope, _HOPS_RAW)
        try:
            hops = parse_hops(None if hops_value is None else _text(hops_value))
        except BadRequestError as exc:
            await _error(send, 400, "BadRequestError", str(exc))
            return
        local = self.local if self.local is not None or self.node is None else self.node.address
        balancer = self.balancer
        if balancer is not None:
            if hops and local is not None and self._proven(scope, hops, local):
                # the server that forwarded it chose this one, counting the load there: serve it
                await self.app(scope, receive, send)
                return
            await self._balanced(scope, receive, send, balancer, key, local, hops)
            return
        try:
            owner = await self.owner(key)
        except BalancerError as exc:
            await _error(send, 503, type(exc).__name__, f"no owner found for {key!r}: {exc}")
            return
        if owner == local:
            await self.app(scope, receive, send)
            return
        await self._send(scope, receive, send, owner, hops)

    def _proven(self, scope: Scope, hops: int, local: str) -> bool:
        """Whether a router sharing the secret forwarded this request to ``local`` with this hop count,
        lately."""
        if self.secret is None:
            return False
        value = _header(scope, _FORWARDED_RAW)
        if value is None:
            return False
        return forward_is_proven(
            self.secret, _text(value), hops, scope["method"], local, proof_path(_target(scope)), self.max_skew
        )

    async def _balanced(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        balancer: BoundedLoadBalancer,
        key: str,
        local: str | None,
        hops: int,
    ) -> None:
        try:
            lease = Lease(key, balancer.acquire(key))
        except CapacityError as exc:
            await _error(send, 503, "CapacityError", str(exc))
            return
        except BalancerError as exc:
            await _error(send, 503, type(exc).__name__, str(exc))
            return
        try:  # the load is released on every way out: success, error, cancellation
            if lease.node == local:
                await self.app(scope, receive, send)
            else:
                await self._send(scope, receive, send, lease.node, hops)
        finally:
            _release(balancer, lease)

    # -- forwarding

    async def _send(self, scope: Scope, receive: Receive, send: Send, owner: str, hops: int) -> None:
        base = self.backend_url(owner)
        # the target as the client sent it, still percent-encoded: decoding it could change its meaning
        target = _target(scope)
        if self.mode == "redirect":
            await _answer(send, 307, b"", [(b"location", (base + target).encode("latin-1"))])
            return
        if hops >= self.max_hops:
            await _error(
                send, 508, "LoopDetected", f"request forwarded {hops} times already; not passing it on"
            )
            return
        if not target.isascii() or any(c <= " " or c == "\x7f" for c in target):
            await _error(send, 400, "BadRequestError", "the request's head cannot be forwarded as it is")
            return
        await self._forward(scope, receive, send, owner, base + target, self._headers(scope, owner, hops))

    def _headers(self, scope: Scope, owner: str, hops: int) -> list[tuple[str, str]]:
        """The headers a forward of the request to ``owner`` carries: the client's end-to-end ones, the hop
        count, the proof (with a secret) and the ``X-Forwarded-`` pair."""
        named = _named(_header(scope, b"connection"))
        headers = [
            (_text(k), _text(v))
            for k, v in scope["headers"]
            if (name := bytes(k).lower()).decode("latin-1") not in _NOT_PASSED and name not in named
        ]
        headers.append((HOPS_HEADER, str(hops + 1)))
        if self.secret is not None:
            proof = prove_forward(self.secret, hops + 1, scope["method"], owner, proof_path(_target(scope)))
            headers.append((FORWARDED_HEADER, proof))
        before = None if b"x-forwarded-for" in named else _header(scope, b"x-forwarded-for")
        client = scope.get("client")
        chain = [_text(before) if before else None, client[0] if client else None]
        headers.append(("X-Forwarded-For", ", ".join(c for c in chain if c)))
        host = _header(scope, b"host")
        if host is not None:
            headers.append(("X-Forwarded-Host", _text(host)))
        elif scope.get("server"):
            server_host, server_port = scope["server"]
            headers.append(("X-Forwarded-Host", f"{server_host}:{server_port}"))
        return headers

    def _client(self) -> aiohttp.ClientSession:
        """The client to the owners, made on first use on the running loop."""
        session = self._session
        loop = asyncio.get_running_loop()
        if session is None or session.closed or self._loop is not loop:
            self._loop = loop
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                auto_decompress=False,  # bodies pass as they are, Content-Encoding with them
                cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies never go out with another's
            )
        return session

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, owner: str, url: str, headers: list[tuple[str, str]]
    ) -> None:
        """Proxy the request to ``url``: its body streamed up as it arrives, the answer streamed back."""
        first = await receive()
        if first["type"] == "http.disconnect":
            return  # the client is gone before a byte went out
        body: bytes | _RequestBody | None
        if first.get("more_body", False):
            body = _RequestBody(receive, first.get("body", b""))
        else:
            body = first.get("body", b"") or None
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            try:
                await self._exchange(
                    scope["method"], url, headers, body, self._client_timeout, tracked, receive
                )
            except aiohttp.ServerDisconnectedError:
                if started or isinstance(body, _RequestBody) or scope["method"] not in _IDEMPOTENT:
                    raise
                # the owner closed a kept-alive connection as the request went out: once more, afresh
                timeout = aiohttp.ClientTimeout(total=max(0.0, deadline - loop.time()))
                await self._exchange(scope["method"], url, headers, body, timeout, tracked, receive)
        except TimeoutError as exc:
            log.info("forwarding to %s timed out after %g s", owner, self.timeout)
            if started:
                raise ForwardError(
                    f"the owner {owner} did not finish its answer in {self.timeout:g} s"
                ) from exc
            await _error(
                send, 504, "GatewayTimeout", f"the owner {owner} did not answer within {self.timeout:g} s"
            )
        except (aiohttp.ClientError, OSError, _ClientGone) as exc:
            log.info("forwarding to %s failed: %s", owner, exc)
            if started:
                raise ForwardError(f"the answer from {owner} broke off: {exc or type(exc).__name__}") from exc
            await _error(
                send, 502, "BadGateway", f"the owner {owner} cannot be reached: {exc or type(exc).__name__}"
            )
        except UnicodeEncodeError:  # a header that was not UTF-8 cannot be written again
            await _error(send, 400, "BadRequestError", "the request's head cannot be forwarded as it is")

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes | _RequestBody | None,
        timeout: aiohttp.ClientTimeout,
        send: Send,
        receive: Receive,
    ) -> None:
        """One request to the owner, and its answer sent back (see :meth:`_forward`)."""
        async with self._client().request(
            method,
            URL(url, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=timeout,
            skip_auto_headers=_NO_AUTO_HEADERS,
        ) as upstream:
            named = _named(upstream.headers.get("Connection", "").encode("latin-1"))
            passed = [
                (k, v)
                for k, v in upstream.raw_headers
                if (name := k.lower()) not in named and name.decode("latin-1") not in _NOT_RETURNED
            ]
            size = upstream.content_length
            if size is not None and size <= _BUFFERED:
                payload = await upstream.read()
                await send({"type": "http.response.start", "status": upstream.status, "headers": passed})
                await send({"type": "http.response.body", "body": payload, "more_body": False})
                return
            await send({"type": "http.response.start", "status": upstream.status, "headers": passed})
            # once the request's body was read whole, the client's receive() tells when it disconnects
            whole = not isinstance(body, _RequestBody) or body.done
            await self._stream_back(upstream, receive if whole else None, send)

    async def _stream_back(
        self, upstream: aiohttp.ClientResponse, receive: Receive | None, send: Send
    ) -> None:
        """Send ``upstream``'s body back as it arrives. With ``receive`` (the request's body was read
        whole), stop early when the client disconnects, rather than reading an answer nobody takes."""
        watch = asyncio.ensure_future(receive()) if receive is not None else None
        try:
            async for data in upstream.content.iter_chunked(_CHUNK):
                if watch is not None and watch.done():
                    if watch.result()["type"] == "http.disconnect":
                        return
                    assert receive is not None
                    watch = asyncio.ensure_future(receive())  # not a disconnect: keep listening
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
