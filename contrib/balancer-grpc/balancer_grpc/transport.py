"""The ``grpc`` transport: ring RPCs over gRPC (grpc.aio), the public HTTP API on a port of its own.

A node on this transport serves gRPC on its port (the address the ring knows it by) and calls each peer
over one gRPC channel, kept and reused for every call to that peer (HTTP/2 multiplexes the calls, and
answers come back in whatever order the handlers finish). Each ring RPC is the gRPC method
``/balancer.Ring/<method>`` with a msgpack body (see :mod:`balancer_grpc.codec`).

The port bounds what it holds as the HTTP port does: the gRPC server listens on 127.0.0.1, behind a
:class:`~balancer_grpc.port.GatedPort` on the node's port that admits connections through a
:class:`~balancer.plugins.connections.ConnectionGate` (a cap fitted to the open-file limit with the HTTP
port's, a reserve for connections that made an authenticated ring RPC, oldest idle public connection
evicted first, ``header_timeout`` to make that first call) and relays them; gRPC's own options bound the
rest (idle and age limits, handshake timeout, concurrent streams, pings).

gRPC owns its port, so the public API (``/kv``, ``/status``, ``/ring``, ``/lookup``, ``/ui`` and plugin
routes such as ``/metrics``) cannot share it: it is served by the ``aiohttp`` transport's HTTP server on
a second port, the plugin setting ``grpc.http_port`` (``--set grpc.http_port=9101``; ``off`` serves none).
Without the setting, a free port is chosen at start and named in a warning in the log.

Who may make ring RPCs, as on the other transports: with a key to sign with (the cluster secret, or one
derived from the API token, :func:`balancer.auth.rpc_secret`), a call signed for this node (the signature,
timestamp, nonce and destination travel as metadata, checked by :class:`balancer.auth.ReplayGuard`); with
mutual TLS (``tls_ca`` and a certificate of the node's own), a caller whose certificate the CA signed. With
``tls_ca`` the gRPC server *requires* a client certificate (gRPC has no "optional" mode; only ring members
call this port), and calls are made over TLS with the node's own certificate.

Failures come back as balancer's errors: a handler's error as its own class (or
:class:`~balancer.errors.RemoteError`), a peer that does not answer within the call's timeout as
:class:`~balancer.errors.PeerUnreachableError`, and one where nothing listens as
``PeerUnreachableError(refused=True)``. A channel whose connection failed is dropped (closed once its
other calls are done), so the next call to that peer dials afresh instead of waiting out gRPC's
reconnection backoff.

All nodes of a ring must use this transport: a node on ``stream`` or ``aiohttp`` cannot call a gRPC port,
nor the reverse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from balancer.auth import ReplayGuard, rpc_secret, signed_headers
from balancer.config import Config
from balancer.errors import BalancerError, ConfigError, PeerUnreachableError, UnauthorizedError
from balancer.errors import UnknownMethodError as _UnknownMethodError
from balancer.hookspecs import Handler, Payload, PublicApi, Transport
from balancer.plugins.aiohttp_transport import AiohttpTransport, rpc_exposure
from balancer.plugins.connections import ConnectionGate
from balancer_grpc.codec import (
    SERVICE,
    SIGNED,
    decode_answer,
    decode_request,
    encode,
    error_trailers,
    method_path,
    raise_for,
)
from balancer_grpc.port import GatedPort, fitted_caps

__all__ = [
    "ANSWER_LIMIT",
    "MAX_CONNECTION_AGE_MS",
    "MAX_IN_FLIGHT",
    "GrpcSettings",
    "GrpcTransport",
    "channel_credentials",
    "server_credentials",
]

log = logging.getLogger(__name__)

ANSWER_LIMIT = 1 << 28
"""Largest answer a caller accepts (256 MiB), as on the ``stream`` transport."""

MAX_IN_FLIGHT = 256
"""Calls one connection may have running on the server at once (HTTP/2's concurrent streams)."""

MAX_CONNECTION_AGE_MS = 60 * 60 * 1000
"""How long the gRPC server keeps one connection (an hour), calls or not, before it asks the caller to dial
again."""

_PREFIX = f"/{SERVICE}/"

_OFF = frozenset({"off", "none", "no", "false"})


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """The transport's settings, from ``Config.extra["grpc"]`` (``--set grpc.KEY=VALUE``).

    :param http_port: the port of the public HTTP API; 0 picks a free one (the default), ``None``
        (``off``) serves no HTTP API.
    """

    http_port: int | None = 0

    @classmethod
    def from_config(cls, config: Config) -> GrpcSettings:
        """Read and check the settings; raises :class:`~balancer.errors.ConfigError` for an unknown key
        or a value out of range."""
        given: Mapping[str, Any] = config.extra.get("grpc", {})
        unknown = set(given) - {"http_port"}
        if unknown:
            raise ConfigError(f"unknown grpc settings: {sorted(unknown)} (known: http_port)")
        raw = given.get("http_port", 0)
        if isinstance(raw, str) and raw.strip().lower() in _OFF:
            return cls(None)
        if raw is None:
            return cls(None)
        text = str(raw).strip()
        if isinstance(raw, bool) or not (text.isascii() and text.isdigit() and int(text) <= 65535):
            raise ConfigError(f"grpc.http_port must be a port (0 to 65535) or off, got {raw!r}")
        port = int(text)
        if port and port == config.port:
            raise ConfigError(
                f"grpc.http_port must differ from the node's port {config.port}: gRPC serves it"
            )
        return cls(port)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def channel_credentials(config: Config) -> grpc.ChannelCredentials | None:
    """The TLS credentials to call peers with, if ``tls_ca`` is set: peers are verified against it, and
    this node presents its own ``tls_cert`` as its client certificate; ``None``: plain connections."""
    if not config.tls_ca:
        return None
    key = cert = None
    if config.tls_cert and config.tls_key:
        key, cert = _read(config.tls_key), _read(config.tls_cert)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.tls_ca), private_key=key, certificate_chain=cert
    )


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """The TLS credentials to serve with, if ``tls_cert``/``tls_key`` are set; with ``tls_ca`` too, every
    caller must present a certificate the CA signed. ``None``: plain connections."""
    if not config.tls_cert or not config.tls_key:
        return None
    pair = [(_read(config.tls_key), _read(config.tls_cert))]
    if config.tls_ca:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(config.tls_ca), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def _body_limit(config: Config) -> int:
    # the HTTP path's limit: the largest value base64-encoded in a payload, its key, and the JSON around
    # it (msgpack carries the same payload in fewer bytes)
    return 4 * ((config.max_value_bytes + 2) // 3) + 4 * config.max_key_bytes + (64 << 10)


def _listen_target(host: str, port: int) -> str:
    if not host:
        return f"[::]:{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Peer:
    """One channel to one peer, and a callable per ring method made on it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def method(self, name: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        callable_ = self._methods.get(name)
        if callable_ is None:
            callable_ = self._methods[name] = self.channel.unary_unary(method_path(name))
        return callable_


class _RingService(grpc.GenericRpcHandler):
    """Serves ``/balancer.Ring/<method>`` from the transport's handlers (read at each call)."""

    def __init__(self, transport: GrpcTransport) -> None:
        self.transport = transport
        self._served: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        path = handler_call_details.method
        if not path.startswith(_PREFIX):
            return None  # not a ring RPC: gRPC answers UNIMPLEMENTED
        name = path[len(_PREFIX) :]
        served = self._served.get(name)
        if served is None:
            served = grpc.unary_unary_rpc_method_handler(self._behaviour(name))
            if name in self.transport.handlers:  # remember only the methods served, never a caller's names
                self._served[name] = served
        return served

    def _behaviour(self, name: str) -> Callable[[bytes, Any], Any]:
        transport = self.transport

        async def answer(body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            failure: BaseException
            relay = transport.gated.served(context.peer()) if transport.gated is not None else None
            if relay is not None:
                relay.busy += 1  # an idle connection may be evicted; this one is not idle
            try:
                if relay is None:  # dialled the loopback port directly, past the gate
                    raise UnauthorizedError("ring RPCs are served on the node's port only")
                transport.authenticate(name, body, context)  # first: a stranger learns nothing
                handler = transport.handlers.get(name)
                if handler is None:
                    raise _UnknownMethodError(f"unknown method {name!r}")
                relay.promote()  # a ring member's call to a method served: kept when public ones crowd in
                return encode(await handler(decode_request(body)))
            except BalancerError as exc:
                failure = exc
            except Exception as exc:
                log.exception("internal error answering %s over gRPC", name)
                failure = exc
            finally:
                if relay is not None:
                    relay.busy -= 1
            code, details, trailers = error_trailers(failure)
            return await context.abort(code, details, trailers)

        return answer


class GrpcTransport(Transport):
    """Ring RPCs over gRPC; the public API over HTTP on ``grpc.http_port``. See the module documentation.

    :param config: the node's settings: ``rpc_timeout`` (how long :meth:`aclose` lets calls in progress
        finish), ``idle_timeout`` (connections idle this long are closed), ``max_connections`` (the cap of
        each port, both lowered together to fit the open-file limit: :func:`~balancer_grpc.port.fitted_caps`),
        ``header_timeout`` (a new gRPC connection's time to make an authenticated call), size limits, the
        RPC keys, the TLS files, and this plugin's own (:class:`GrpcSettings`).
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.settings = GrpcSettings.from_config(self.config)
        """The plugin's settings."""
        self.handlers: Mapping[str, Handler] = {}
        """The RPC handlers served, once serving."""
        self.body_limit = _body_limit(self.config)
        """The largest request the server reads, in bytes."""
        self.http: AiohttpTransport | None = None
        """The HTTP server of the public API, once serving (``None`` with ``grpc.http_port=off``)."""
        self.http_port: int | None = None
        """The port of the public HTTP API, once serving."""
        self.port: int | None = None
        """The gRPC port (the gated one, the ring's address of the node), once serving."""
        self.guard: ReplayGuard | None = None
        """The server's replay guard, once serving with a key."""
        self.gated: GatedPort | None = None
        """The public gRPC port and its connection gate, once serving."""
        self.secret = rpc_secret(self.config.cluster_secret, self.config.api_token)
        """The key ring RPCs are signed with, if any."""
        self.mutual = bool(self.config.tls_ca and self.config.tls_cert)
        """Whether callers may authenticate with a certificate signed by ``tls_ca``."""
        self._credentials = channel_credentials(self.config)
        self._http_config = self.config  # with the HTTP port's share of the connections, once serving
        self._server: grpc.aio.Server | None = None
        self._peers: dict[str, _Peer] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        idle_ms = int(self.config.idle_timeout * 1000)
        self._channel_options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", ANSWER_LIMIT),
            ("grpc.max_send_message_length", -1),
            ("grpc.enable_http_proxy", 0),  # ring traffic goes straight to the peer, whatever the environment
            ("grpc.use_local_subchannel_pool", 1),  # a new channel never inherits a failed one's backoff
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.client_idle_timeout_ms", max(1000, idle_ms // 2)),  # before the server would close it
        ]
        rpc_ms = int(self.config.rpc_timeout * 1000)
        self._server_options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 0),  # a taken port is an error, never a second server on it
            ("grpc.max_receive_message_length", self.body_limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", MAX_IN_FLIGHT),
            ("grpc.max_connection_idle_ms", max(1000, idle_ms)),
            # a connection re-proves itself now and then (a certificate revoked since, say): GOAWAY, and
            # the calls in progress get twice the RPC timeout to finish; a peer's channel redials unnoticed
            ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ("grpc.max_connection_age_grace_ms", max(1000, 2 * rpc_ms)),
            ("grpc.server_handshake_timeout_ms", max(1000, int(self.config.header_timeout * 1000))),
            # ring members never ping; a caller pinging an idle connection to keep it is sent away
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5 * 60 * 1000),
            ("grpc.http2.max_ping_strikes", 2),
        ]

    # -- serving ----------------------------------------------------------------------------------

    async def serve(
        self, host: str, port: int, handlers: Mapping[str, Handler], api: PublicApi | None = None
    ) -> int:
        """Serve ``handlers`` over gRPC on ``host``:``port`` (0 picks a free port) and ``api`` over HTTP on
        ``grpc.http_port``; returns the gRPC port.

        Raises :class:`OSError` (``EADDRINUSE``) if the gRPC port cannot be bound, and
        :class:`~balancer.errors.ConfigError` for ``tls_ca`` without a certificate to serve with.
        """
        if self._closed or self._server is not None:
            raise RuntimeError("this transport is closed or already serving")
        config = self.config
        if config.tls_ca and not config.tls_cert:
            raise ConfigError("tls_ca needs tls_cert and tls_key: peers present certificates only over TLS")
        self.handlers = handlers
        http_cap, grpc_cap = fitted_caps(config.max_connections)
        if min(http_cap, grpc_cap) < config.max_connections:
            log.warning(
                "serving at most %d HTTP and %d gRPC connections, not %d each: the open-file limit "
                "leaves no room for more",
                http_cap,
                grpc_cap,
                config.max_connections,
            )
        self._http_config = dataclasses.replace(config, max_connections=http_cap)
        # gRPC has no hook to refuse a connection: it listens on loopback, behind a gated port of ours;
        # its own cap only bounds what dials the loopback port past the gate
        options = [*self._server_options, ("grpc.max_allowed_incoming_connections", 2 * grpc_cap)]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((_RingService(self),))
        credentials = server_credentials(config)
        inner = "127.0.0.1:0"
        try:
            inner_port = (
                server.add_secure_port(inner, credentials)
                if credentials is not None
                else server.add_insecure_port(inner)
            )
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise OSError(errno.EADDRINUSE, f"cannot listen on {inner} for gRPC: {exc}") from None
        if not inner_port:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {inner} for gRPC")
        await server.start()
        self._server = server
        gated = GatedPort(ConnectionGate(grpc_cap, header_timeout=config.header_timeout), inner_port)
        try:
            bound = await gated.listen(host, port)
        except OSError as exc:
            await server.stop(None)
            self._server = None
            target = _listen_target(host, port)
            code = exc.errno or errno.EADDRINUSE
            raise OSError(code, f"cannot listen on {target} for gRPC: {exc}") from None
        self.gated, self.port = gated, bound
        if self.secret is not None:
            self.guard = ReplayGuard(self.secret, config.max_clock_skew)
            self.guard.answer_as(f"{config.advertised}:{bound}", f"{host}:{bound}")
        try:
            await self._serve_http(host, handlers, api)
        except BaseException:
            await self.aclose()
            raise
        if self.http is None and (warning := rpc_exposure(config, host)) is not None:
            log.warning("%s", warning)
        return bound

    async def _serve_http(self, host: str, handlers: Mapping[str, Handler], api: PublicApi | None) -> None:
        wanted = self.settings.http_port
        if api is None or wanted is None:
            if api is not None:
                log.warning("grpc.http_port is off: this node serves no HTTP API (/kv, /status, /ring, /ui)")
            return
        self.http = AiohttpTransport(self._http_config)
        self.http_port = await self.http.serve(host, wanted, handlers, api)
        where = f"http://{self.config.advertised}:{self.http_port}"
        if wanted == 0:
            log.warning(
                "the HTTP API (/kv, /status, /ring, /ui) is at %s: port %d serves gRPC "
                "(set grpc.http_port to choose the HTTP port: --set grpc.http_port=N)",
                where,
                self.port,
            )
        else:
            log.info("the HTTP API is at %s; gRPC on port %d", where, self.port)

    def authenticate(self, method: str, body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        """Raise :class:`~balancer.errors.UnauthorizedError` unless the caller may make ring RPCs: it
        presented a certificate the CA signed (mutual TLS), or it signed the call for this node."""
        if self.mutual and context.peer_identities() is not None:
            return
        if self.guard is not None:
            headers = {SIGNED[k]: v for k, v in context.invocation_metadata() or () if k in SIGNED}
            self.guard.check(method, {k: v for k, v in headers.items() if isinstance(v, str)}, body)
            return
        if self.mutual:
            raise UnauthorizedError("ring RPCs need a client certificate signed by the cluster's CA")

    # -- calling ----------------------------------------------------------------------------------

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            channel = (
                grpc.aio.secure_channel(address, self._credentials, options=self._channel_options)
                if self._credentials is not None
                else grpc.aio.insecure_channel(address, options=self._channel_options)
            )
            peer = self._peers[address] = _Peer(channel)
        return peer

    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """Call ``method`` at ``address`` over its channel (made on first use) within ``timeout`` seconds.

        Raises :class:`PeerUnreachableError` on a timeout or when the peer cannot be reached (``refused``
        when nothing listens there); an error answer is raised as its balancer class where it can be
        rebuilt, else as :class:`~balancer.errors.RemoteError`.
        """
        if self._closed:
            raise PeerUnreachableError(address, "this transport is closed")
        peer = self._peer(address)
        body = encode(payload)
        metadata = None
        if self.secret is not None:
            signed = signed_headers(self.secret, method, address, body)
            metadata = tuple((name.lower(), value) for name, value in signed.items())
        try:
            answer = await peer.method(method)(body, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            error = raise_for(address, exc)
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not isinstance(error, UnauthorizedError):
                self._retire(address, peer)
            raise error from None
        return decode_answer(answer)

    def _retire(self, address: str, peer: _Peer) -> None:
        """Stop using ``peer``'s channel (its connection failed); close it once its calls are done."""
        if self._peers.get(address) is not peer:
            return
        del self._peers[address]
        task = asyncio.get_running_loop().create_task(peer.channel.close(grace=self.config.rpc_timeout))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        """Stop serving (calls in progress get ``rpc_timeout`` to finish) and close every channel; calling
        it again does nothing."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        peers, self._peers = list(self._peers.values()), {}
        http, self.http = self.http, None
        gated = self.gated
        try:
            if gated is not None:
                gated.stop_listening()  # new callers are refused; calls in progress still get answered
            if server is not None:
                await server.stop(grace=self.config.rpc_timeout)
        finally:
            if gated is not None:
                await gated.aclose()
            await asyncio.gather(*(p.channel.close() for p in peers), return_exceptions=True)
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            if http is not None:
                await http.aclose()
