"""The ``aiohttp`` transport: nodes talk HTTP/1.1 with JSON bodies, and clients use the same port.

Internal RPCs are ``POST /rpc/<method>`` with a JSON object in and a JSON object out. When the node offers
a :class:`~balancer.hookspecs.PublicApi`, it also serves ``GET``/``PUT``/``DELETE /kv/<key>`` (raw value
bytes), ``GET /status`` and ``GET /ring``. Every error answer is
``{"error": {"type": ..., "message": ...}}`` with the status from :data:`STATUS`; the client turns it back
into the same balancer error where it can.

Who may call ``/rpc/``: with a key to sign with (the cluster secret, or one derived from the API token,
see :func:`~balancer.auth.rpc_secret`), a request signed for this node; with mutual TLS (``tls_ca`` and a
certificate of the node's own), a client that presented a certificate signed by the CA. Either one is
enough; with neither configured the RPC path is open, and a node listening beyond loopback says so at
start-up. Connections go through a :class:`~balancer.plugins.connections.ConnectionGate`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.typedefs import Middleware

from balancer import errors
from balancer.auth import ReplayGuard, rpc_secret, signed_headers
from balancer.config import Config
from balancer.errors import (
    BadAnswerError,
    BadRequestError,
    BalancerError,
    ConfigError,
    PeerUnreachableError,
    QuorumError,
    TooLargeError,
    UnauthorizedError,
    UnknownMethodError,
)
from balancer.hookspecs import Handler, Payload, PublicApi, Route, Transport, TransportFactory, hookimpl
from balancer.plugins.connections import ConnectionGate, GatedHandler, GatedSite, fitted_cap

__all__ = ["STATUS", "AiohttpTransport", "client_ssl", "rpc_exposure", "server_ssl", "status_for"]

log = logging.getLogger(__name__)

STATUS: dict[type[BaseException], int] = {
    errors.BadRequestError: 400,
    errors.ConfigError: 400,
    errors.KeyNotFoundError: 404,
    errors.UnknownMethodError: 404,
    errors.TooLargeError: 413,
    errors.IncompatibleConfigError: 409,
    errors.GoneError: 410,
    errors.UnauthorizedError: 401,
    errors.PeerUnreachableError: 503,
    errors.RingError: 503,
    errors.BalancerError: 500,
}
"""The HTTP status of each balancer error; a class not listed takes its nearest listed base's status."""

_HANDLERS = web.AppKey[Mapping[str, Handler]]("handlers")
_API = web.AppKey("api", PublicApi)
_CONFIG = web.AppKey("config", Config)


@dataclass(frozen=True, slots=True)
class _RpcAuth:
    """How this server authenticates ``/rpc/`` callers; both None/False: the path is open."""

    guard: ReplayGuard | None
    mutual: bool


_RPC_AUTH = web.AppKey("rpc_auth", _RpcAuth)


def status_for(exc: BaseException) -> int:
    """The HTTP status answering ``exc``: from :data:`STATUS` by its class or nearest base, else 500."""
    return next((STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS), 500)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: BaseException) -> web.Response:
    kind = type(exc).__name__ if isinstance(exc, BalancerError) else "InternalError"
    message = str(exc) if isinstance(exc, BalancerError) else f"{type(exc).__name__}: {exc}"
    error: dict[str, Any] = {"type": kind, "message": message}
    if isinstance(exc, errors.ClockFencedError):  # refused before anything was sent: nothing may appear
        error |= {"ahead": round(exc.ahead, 3), "ahead_error": round(exc.error, 3), "bound": exc.bound}
    elif isinstance(exc, QuorumError):  # how far a failed write got: it may still appear
        error |= {"operation": exc.operation, "answered": exc.answered, "needed": exc.needed}
    return _json({"error": error}, status_for(exc))


def _error_middleware(*, body_limit: int) -> Middleware:
    """Answer every failure with the JSON error body, never aiohttp's HTML page or a traceback; and mark
    the connection busy while its request is handled (for the :class:`ConnectionGate`).

    One middleware for both: each layer of aiohttp's middleware chain costs every request a coroutine.
    """

    @web.middleware
    async def error_middleware(request: web.Request, handler: WebHandler) -> web.StreamResponse:
        gated = request.protocol if isinstance(request.protocol, GatedHandler) else None
        if gated is not None:
            gated.begin()
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:  # a body over client_max_size
            return _error(TooLargeError(f"request body is over the limit of {body_limit} bytes"))
        except web.HTTPException as exc:  # no such route, method not allowed
            if exc.status < 400:
                raise
            return _json({"error": {"type": type(exc).__name__, "message": exc.reason}}, exc.status)
        except BalancerError as exc:
            return _error(exc)
        except Exception as exc:
            log.exception("internal error answering %s %s", request.method, request.path)
            return _error(exc)
        finally:
            if gated is not None:
                gated.end()

    return error_middleware


def _body_limit(config: Config) -> int:
    # Room for the largest value base64-encoded inside an RPC payload, its key, and the JSON around it.
    return 4 * ((config.max_value_bytes + 2) // 3) + 4 * config.max_key_bytes + (64 << 10)


def _verified_peer(request: web.Request) -> bool:
    """Whether the client presented a certificate the TLS layer verified against the CA."""
    transport = request.transport
    # with CERT_OPTIONAL, a certificate that does not verify fails the handshake; one that got here is good
    return transport is not None and bool(transport.get_extra_info("peercert"))


def _authenticate(request: web.Request, method: str, body: bytes) -> None:
    auth = request.app[_RPC_AUTH]
    if auth.mutual and _verified_peer(request):
        return
    if auth.guard is not None:
        auth.guard.check(method, request.headers, body)
        return
    if auth.mutual:
        raise UnauthorizedError("ring RPCs need a client certificate signed by the cluster's CA")


async def _rpc(request: web.Request) -> web.Response:
    method = request.match_info["method"]
    body = await request.read()
    # checked first: a caller that is not a member learns nothing and changes nothing
    _authenticate(request, method, body)
    if isinstance(conn := request.protocol, GatedHandler):
        conn.gate.promote(conn)  # a ring member's connection: kept when public ones crowd in
    handler = request.app[_HANDLERS].get(method)
    if handler is None:
        raise UnknownMethodError(f"unknown method {method!r}")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestError(f"body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadRequestError(f"body must be a JSON object, not {type(payload).__name__}")
    return _json(await handler(payload))


def _authorize(request: web.Request) -> None:
    token = request.app[_CONFIG].api_token
    if token is None:
        return
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates; encode them back, never fail
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, f"Bearer {token}".encode("utf-8", "surrogateescape")):
        raise UnauthorizedError("the API needs 'Authorization: Bearer <token>'")


def _key(request: web.Request) -> str:
    _authorize(request)
    key = request.match_info["key"]
    if not key:
        raise BadRequestError("empty key")
    limit = request.app[_CONFIG].max_key_bytes
    if (size := len(key.encode())) > limit:
        raise TooLargeError(f"key is {size} bytes; the limit is {limit} bytes")
    return key


async def _get(request: web.Request) -> web.Response:
    value = await request.app[_API].get(_key(request))
    return web.Response(body=value, content_type="application/octet-stream")


async def _put(request: web.Request) -> web.Response:
    key = _key(request)
    limit = request.app[_CONFIG].max_value_bytes
    declared = request.content_length or 0
    value = b"" if declared > limit else await request.read()  # refuse a declared over-size body unread
    if (size := max(declared, len(value))) > limit:
        raise TooLargeError(f"value is {size} bytes; the limit is {limit} bytes")
    await request.app[_API].put(key, value)
    return _json({"stored": key})


async def _delete(request: web.Request) -> web.Response:
    key = _key(request)
    await request.app[_API].delete(key)
    return _json({"deleted": key})


async def _status(request: web.Request) -> web.Response:
    _authorize(request)
    return _json(await request.app[_API].status())


async def _ring(request: web.Request) -> web.Response:
    _authorize(request)
    return _json(await request.app[_API].ring_view())


async def _lookup(request: web.Request) -> web.Response:
    return _json(await request.app[_API].lookup_view(_key(request)))


def server_ssl(config: Config) -> ssl.SSLContext | None:
    """The TLS context to serve with, if ``tls_cert``/``tls_key`` are set.

    With ``tls_ca`` too, clients are asked for a certificate: one that is presented must be signed by the
    CA (else the handshake fails); one that is not is allowed, so the public ``/kv`` API needs none, and the
    ``/rpc/`` path refuses such a caller unless it signed the request.
    """
    if not config.tls_cert or not config.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca:
        context.load_verify_locations(cafile=config.tls_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_ssl(config: Config) -> ssl.SSLContext | None:
    """The TLS context to call peers with, if ``tls_ca`` is set: peers are verified against it, and this
    node presents its own ``tls_cert`` as its client certificate."""
    if not config.tls_ca:
        return None
    context = ssl.create_default_context(cafile=config.tls_ca)
    if config.tls_cert and config.tls_key:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def rpc_exposure(config: Config, host: str) -> str | None:
    """The start-up warning for a node whose RPC path anyone could use, or None.

    That is a node listening on ``host`` beyond loopback with no key to check signatures (no cluster secret,
    no API token) and no mutual TLS.
    """
    if _is_loopback(host) or rpc_secret(config.cluster_secret, config.api_token):
        return None
    if config.tls_ca and config.tls_cert:
        return None
    return (
        f"listening on {host or 'every interface'!r} with no cluster secret and no mutual TLS: anyone who "
        "reaches this port can make ring RPCs (set --cluster-secret, or --tls-cert/--tls-key/--tls-ca)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" for every interface
        return False


def _serve_route(route: Route) -> WebHandler:
    async def serve(request: web.Request) -> web.StreamResponse:
        if not route.public:
            _authorize(request)  # a plugin's endpoint (metrics, say) is as guarded as /status
        status, content_type, body = await route.handler()
        # set as a header: aiohttp's content_type argument refuses parameters such as charset
        return web.Response(body=body, status=status, headers={"Content-Type": content_type})

    return serve


@contextmanager
def _reaching(address: str) -> Iterator[None]:
    """Turn every way of failing to reach ``address`` into :class:`PeerUnreachableError`."""
    try:
        yield
    except TimeoutError as exc:  # asyncio.TimeoutError is TimeoutError on Python >= 3.11
        raise PeerUnreachableError(address, "timed out") from exc
    except (aiohttp.ClientError, OSError) as exc:
        # a refused connection means no process listens there; a reset or a timeout may be a slow peer
        cause = getattr(exc, "os_error", exc)
        refused = isinstance(cause, ConnectionRefusedError)
        raise PeerUnreachableError(address, str(exc) or type(exc).__name__, refused=refused) from exc


def _answer(status: int, body: bytes) -> Payload:
    """The result in an RPC answer, or the error it carries raised as a balancer error.

    An answer that is not balancer's JSON (an HTML page from some other server, say) raises
    :class:`~balancer.errors.BadAnswerError`, whose message never quotes the body.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadAnswerError(status, f"is not JSON ({len(body)} bytes)") from None
    if status == 200:
        if isinstance(data, dict):
            return data
        raise BadAnswerError(status, f"is a JSON {type(data).__name__}, not an object")
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        raise BadAnswerError(status, "is JSON without a balancer error in it")
    raise errors.rebuild(str(error.get("type")), str(error.get("message")), status)


class AiohttpTransport(Transport):
    """RPCs and the public key-value API over HTTP/1.1, served and called with aiohttp.

    :param config: size limits (``max_key_bytes``, ``max_value_bytes``) and ``rpc_timeout``: :meth:`aclose`
        lets requests in progress finish for that long (aiohttp's grace, at most twice it), then cancels them;
        the connection limits (``max_connections``, ``idle_timeout``, ``header_timeout``); the RPC keys and
        TLS files.
    :param connection_limit: most connections open at once to all peers together.

    A handler whose caller hangs up (a timeout, say) is cancelled, as a handler called in-process through
    the ``local`` transport is when its caller is.
    """

    def __init__(self, config: Config | None = None, *, connection_limit: int = 100) -> None:
        self.config = config or Config()
        self.connection_limit = connection_limit
        self.gate: ConnectionGate | None = None
        """The server's connection gate, once serving."""
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._closed = False
        self._secret = rpc_secret(self.config.cluster_secret, self.config.api_token)
        self._client_ssl = client_ssl(self.config)
        self._scheme = "https" if self._client_ssl else "http"
        self._loop_handlers: tuple[Any, Any] | None = None  # (ours, the one it replaced)
        self._guard: ReplayGuard | None = None
        self.handlers: Mapping[str, Handler] = {}
        """The RPC handlers served, once serving."""
        self.body_limit = _body_limit(self.config)
        """The largest RPC body the server reads, in bytes."""

    async def serve(
        self, host: str, port: int, handlers: Mapping[str, Handler], api: PublicApi | None = None
    ) -> int:
        """Listen on ``host``:``port`` (0 picks a free port) and return the port bound.

        Raises :class:`~balancer.errors.ConfigError` for ``tls_ca`` without a certificate to serve with:
        peers can present their certificates only over TLS.
        """
        if self._closed or self._runner is not None:
            raise RuntimeError("this transport is closed or already serving")
        config = self.config
        if config.tls_ca and not config.tls_cert:
            raise ConfigError("tls_ca needs tls_cert and tls_key: peers present certificates only over TLS")
        limit = self.body_limit
        cap = fitted_cap(config.max_connections, outgoing=self.connection_limit)
        if cap < config.max_connections:
            log.warning(
                "serving at most %d connections, not %d: the open-file limit leaves no room for more",
                cap,
                config.max_connections,
            )
        self.gate = gate = ConnectionGate(cap, header_timeout=config.header_timeout)
        app = web.Application(client_max_size=limit, middlewares=[_error_middleware(body_limit=limit)])
        app[_HANDLERS], app[_CONFIG] = handlers, config
        guard = ReplayGuard(self._secret, config.max_clock_skew) if self._secret else None
        self._guard, self.handlers = guard, handlers
        mutual = bool(config.tls_ca and config.tls_cert)
        app[_RPC_AUTH] = _RpcAuth(guard, mutual)
        app.router.add_post("/rpc/{method}", _rpc)
        if api is not None:
            app[_API] = api
            app.router.add_get("/kv/{key:.*}", _get)
            app.router.add_put("/kv/{key:.*}", _put)
            app.router.add_delete("/kv/{key:.*}", _delete)
            app.router.add_get("/status", _status)
            app.router.add_get("/ring", _ring)
            app.router.add_get("/lookup/{key:.*}", _lookup)
            for route in api.routes():
                app.router.add_route(route.method, route.path, _serve_route(route))
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=config.rpc_timeout)
        await runner.setup()
        self._runner = runner
        options = {
            "keepalive_timeout": config.idle_timeout,
            # a key of max_key_bytes, every byte percent-encoded, must reach the handler and get its 413
            "max_line_size": max(8190, 3 * config.max_key_bytes + 1024),
        }
        site = GatedSite(
            runner,
            host,
            port,
            gate=gate,
            handler_options=options,
            ssl_context=server_ssl(config),
            handshake_timeout=config.header_timeout,
            binary=self._binary(),
        )
        await site.start()
        bound = int(runner.addresses[0][1])
        if guard is not None:
            guard.answer_as(f"{config.advertised}:{bound}", f"{host}:{bound}")
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        ours = gate.exception_handler(previous)
        loop.set_exception_handler(ours)
        self._loop_handlers = (ours, previous)
        if (warning := rpc_exposure(config, host)) is not None:
            log.warning("%s", warning)
        elif not config.cluster_secret and self._secret is not None:
            log.info("ring RPCs are signed with a key derived from the API token (no cluster secret set)")
        return bound

    def _binary(self) -> Callable[[float], asyncio.Protocol] | None:
        """The protocol for connections that open with a NUL byte (not HTTP); none here: such a
        connection is answered as a malformed HTTP request."""
        return None

    # The Transport contract takes a per-call timeout; it becomes the aiohttp request's total timeout.
    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """POST ``payload`` to ``address``'s ``method``; raises :class:`PeerUnreachableError` on timeout.

        An error answer is raised as its balancer class where it can be rebuilt from its message,
        otherwise as :class:`RemoteError`.
        """
        if self._closed:
            raise PeerUnreachableError(address, "this transport is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.connection_limit, ssl=self._client_ssl or True)
            self._session = aiohttp.ClientSession(connector=connector)
        body = orjson.dumps(payload)
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers.update(signed_headers(self._secret, method, address, body))
        with _reaching(address):
            async with self._session.post(
                f"{self._scheme}://{address}/rpc/{method}",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                status, body = response.status, await response.read()
        return _answer(status, body)

    async def aclose(self) -> None:
        """Stop serving and close client connections; calling it again does nothing."""
        self._closed = True
        if self.gate is not None:
            self.gate.close()
        if self._loop_handlers is not None:
            (ours, previous), self._loop_handlers = self._loop_handlers, None
            loop = asyncio.get_running_loop()
            if loop.get_exception_handler() is ours:  # never undo a handler someone set after ours
                loop.set_exception_handler(previous)
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            if session is not None:
                await session.close()


@hookimpl(trylast=True)
def balancer_register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    """Register ``aiohttp``."""

    def make(config: Config) -> Transport:
        return AiohttpTransport(config)

    register("aiohttp", make)
