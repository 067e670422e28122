"""The ``aiohttp`` transport: nodes talk HTTP/1.1 with JSON bodies, and clients use the same port.

Internal RPCs are ``POST /rpc/<method>`` with a JSON object in and a JSON object out. When the node offers
a :class:`~balancer.hookspecs.PublicApi`, it also serves ``GET``/``PUT``/``DELETE /kv/<key>`` (raw value
bytes) and ``GET /status``. Every error answer is ``{"error": {"type": ..., "message": ...}}`` with the
status from :data:`STATUS`; the client turns it back into the same balancer error where it can.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler as WebHandler
from aiohttp.typedefs import Middleware

from balancer import errors
from balancer.auth import ReplayGuard, signed_headers
from balancer.config import Config
from balancer.errors import (
    BadAnswerError,
    BadRequestError,
    BalancerError,
    KeyNotFoundError,
    PeerUnreachableError,
    RemoteError,
    TooLargeError,
    UnauthorizedError,
    UnknownMethodError,
)
from balancer.hookspecs import Handler, Payload, PublicApi, Route, Transport, TransportFactory, hookimpl

__all__ = ["STATUS", "AiohttpTransport", "client_ssl", "server_ssl", "status_for"]

log = logging.getLogger(__name__)

STATUS: dict[type[BaseException], int] = {
    errors.BadRequestError: 400,
    errors.ConfigError: 400,
    errors.KeyNotFoundError: 404,
    errors.UnknownMethodError: 404,
    errors.TooLargeError: 413,
    errors.IncompatibleConfigError: 409,
    errors.UnauthorizedError: 401,
    errors.PeerUnreachableError: 503,
    errors.RingError: 503,
    errors.BalancerError: 500,
}
"""The HTTP status of each balancer error; a class not listed takes its nearest listed base's status."""

# Error classes the client raises again as themselves; each is rebuilt from the message alone.
_REBUILD: dict[str, Callable[[str], BalancerError]] = {
    cls.__name__: cls
    for cls in (
        errors.BadRequestError,
        errors.ConfigError,
        errors.IncompatibleConfigError,
        errors.RingError,
        errors.TooLargeError,
        errors.UnknownMethodError,
        errors.UnauthorizedError,
    )
}
_REBUILD["KeyNotFoundError"] = lambda message: KeyNotFoundError(message.removeprefix("not found: "))

_HANDLERS = web.AppKey[Mapping[str, Handler]]("handlers")
_API = web.AppKey("api", PublicApi)
_CONFIG = web.AppKey("config", Config)
_GUARD = web.AppKey("guard", ReplayGuard)


def status_for(exc: BaseException) -> int:
    """The HTTP status answering ``exc``: from :data:`STATUS` by its class or nearest base, else 500."""
    return next((STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS), 500)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: BaseException) -> web.Response:
    kind = type(exc).__name__ if isinstance(exc, BalancerError) else "InternalError"
    message = str(exc) if isinstance(exc, BalancerError) else f"{type(exc).__name__}: {exc}"
    return _json({"error": {"type": kind, "message": message}}, status_for(exc))


def _error_middleware(*, body_limit: int) -> Middleware:
    """Answer every failure with the JSON error body, never aiohttp's HTML page or a traceback."""

    @web.middleware
    async def error_middleware(request: web.Request, handler: WebHandler) -> web.StreamResponse:
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

    return error_middleware


def _body_limit(config: Config) -> int:
    # Room for the largest value base64-encoded inside an RPC payload, its key, and the JSON around it.
    return 4 * ((config.max_value_bytes + 2) // 3) + 4 * config.max_key_bytes + (64 << 10)


async def _rpc(request: web.Request) -> web.Response:
    method = request.match_info["method"]
    body = await request.read()
    guard = request.app.get(_GUARD)
    if guard is not None:  # checked first: an unsigned request learns nothing and changes nothing
        guard.check(method, request.headers, body)
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
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
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


def server_ssl(config: Config) -> ssl.SSLContext | None:
    """The TLS context to serve with, if ``tls_cert``/``tls_key`` are set."""
    if not config.tls_cert or not config.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def client_ssl(config: Config) -> ssl.SSLContext | None:
    """The TLS context to call peers with, if ``tls_ca`` is set (peers are verified against it)."""
    if not config.tls_ca:
        return None
    return ssl.create_default_context(cafile=config.tls_ca)


def _serve_route(route: Route) -> WebHandler:
    async def serve(request: web.Request) -> web.StreamResponse:
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
        raise PeerUnreachableError(address, str(exc) or type(exc).__name__) from exc


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
    kind, message = str(error.get("type")), str(error.get("message"))
    rebuild = _REBUILD.get(kind)
    raise rebuild(message) if rebuild else RemoteError(kind, message, status)


class AiohttpTransport(Transport):
    """RPCs and the public key-value API over HTTP/1.1, served and called with aiohttp.

    :param config: size limits (``max_key_bytes``, ``max_value_bytes``) and ``rpc_timeout``: :meth:`aclose`
        lets requests in progress finish for that long (aiohttp's grace, at most twice it), then cancels them.
    :param connection_limit: most connections open at once to all peers together.

    A handler whose caller hangs up (a timeout, say) is cancelled, as a handler called in-process through
    the ``local`` transport is when its caller is.
    """

    def __init__(self, config: Config | None = None, *, connection_limit: int = 100) -> None:
        self.config = config or Config()
        self.connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._closed = False
        self._scheme = "https" if client_ssl(self.config) else "http"

    async def serve(
        self, host: str, port: int, handlers: Mapping[str, Handler], api: PublicApi | None = None
    ) -> int:
        """Listen on ``host``:``port`` (0 picks a free port) and return the port bound."""
        if self._closed or self._runner is not None:
            raise RuntimeError("this transport is closed or already serving")
        limit = _body_limit(self.config)
        app = web.Application(client_max_size=limit, middlewares=[_error_middleware(body_limit=limit)])
        app[_HANDLERS], app[_CONFIG] = handlers, self.config
        if self.config.cluster_secret:
            app[_GUARD] = ReplayGuard(self.config.cluster_secret, self.config.max_clock_skew)
        app.router.add_post("/rpc/{method}", _rpc)
        if api is not None:
            app[_API] = api
            app.router.add_get("/kv/{key:.*}", _get)
            app.router.add_put("/kv/{key:.*}", _put)
            app.router.add_delete("/kv/{key:.*}", _delete)
            app.router.add_get("/status", _status)
            for route in api.routes():
                app.router.add_route(route.method, route.path, _serve_route(route))
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=self.config.rpc_timeout)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, host, port, ssl_context=server_ssl(self.config)).start()
        return int(runner.addresses[0][1])

    # The Transport contract takes a per-call timeout; it becomes the aiohttp request's total timeout.
    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """POST ``payload`` to ``address``'s ``method``; raises :class:`PeerUnreachableError` on timeout.

        An error answer is raised as its balancer class where it can be rebuilt from its message,
        otherwise as :class:`RemoteError`.
        """
        if self._closed:
            raise PeerUnreachableError(address, "this transport is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.connection_limit, ssl=client_ssl(self.config) or True)
            self._session = aiohttp.ClientSession(connector=connector)
        body = orjson.dumps(payload)
        headers = {"Content-Type": "application/json"}
        if self.config.cluster_secret:
            headers.update(signed_headers(self.config.cluster_secret, method, body))
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
