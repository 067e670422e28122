"""A gRPC server interceptor that serves each call on the owner of its key, forwarding it there if need be.

:class:`RoutingInterceptor` is the gRPC counterpart of :class:`balancer.middleware.RingRouter`. For every
call it finds a routing key: ``request_key(method, request)`` if given (on the deserialized request of a
unary-request method), else the ``x-balancer-key`` metadata entry; a call without a key is served here.
The key's owner comes from a ring :class:`~balancer.node.Node` (the owner of the key's ring id; with
``load_factor``, bounded-load hashing over the ring's live members) or from a
:class:`~balancer.bounded.BoundedLoadBalancer` over backend addresses, with calls in flight as the load.
If this server is the owner the call is served here; otherwise it is forwarded to the owner over a gRPC
channel kept per owner: the request's bytes as they came, the caller's metadata, and the remaining
deadline (at most ``timeout``), with the answer's bytes, metadata and status passed back.

The loop guard is the HTTP middleware's, in metadata:

- every forwarded call carries ``x-balancer-hops``, the number of forwards so far; a server whose view
  names yet another owner forwards again, but a call already forwarded ``max_hops`` times is refused with
  ``ABORTED`` (the middleware's 508), so two servers that disagree about an owner cannot bounce a call
  forever; a hop count that is not a small decimal number gets ``INVALID_ARGUMENT`` (400);
- with a balancer, the forwarding server has made the choice (and counts the load), so the receiver serves
  the call, but only if the forward is proven: servers that share a secret (``secret=``, or the ring
  node's cluster secret) add ``x-balancer-forwarded``, ``<timestamp ms>:<HMAC>`` over the hop count, the
  method, the destination and the timestamp (:func:`balancer.auth.sign`). A hop count a client wrote
  itself is only counted for the loop guard, never trusted to skip routing.

Errors are the middleware's, as gRPC statuses: an owner that cannot be reached gives ``UNAVAILABLE`` (502),
one that does not answer in time ``DEADLINE_EXCEEDED`` (504), a key with no owner (the ring cannot look
it up, every backend is at capacity) ``UNAVAILABLE`` (503). Each carries the trailing metadata
``x-balancer-error`` naming what happened (``BadGateway``, ``GatewayTimeout``, ``LoopDetected``,
``BadRequestError``, or the balancer error's class), as the transport's error answers do. Any other status
of the owner's answer is passed back as it is.

Handlers must be ``async``: coroutines for unary answers, async generators for streamed answers. A call
whose requests stream in (client or bidirectional streaming) is routed by its metadata key only.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from balancer.auth import sign
from balancer.bounded import BoundedLoadBalancer, Lease
from balancer.errors import BalancerError
from balancer.middleware import MemberBalancer, check_router, forward_secret
from balancer_grpc.codec import ERROR_TYPE

if TYPE_CHECKING:
    from fractions import Fraction

    from balancer.node import Node

__all__ = [
    "FORWARDED_METADATA",
    "HOPS_METADATA",
    "KEY_METADATA",
    "Metadata",
    "RequestKey",
    "RoutingInterceptor",
    "forwarded",
]

log = logging.getLogger(__name__)

KEY_METADATA = "x-balancer-key"
"""Metadata entry a client sets to name a call's routing key."""
HOPS_METADATA = "x-balancer-hops"
"""How many times a call has been forwarded already (the loop guard)."""
FORWARDED_METADATA = "x-balancer-forwarded"
"""``<timestamp ms>:<HMAC>``: proves a router sharing the secret forwarded the call with its hop count."""

Metadata = Sequence[tuple[str, str | bytes]]
"""gRPC metadata: (name, value) pairs, bytes values for ``-bin`` names."""
RequestKey = Callable[[str, Any], "str | None"]
"""``request_key(method, request)``: a call's routing key from its method path and deserialized request,
or ``None`` (then the ``x-balancer-key`` metadata entry decides)."""

_NOT_PASSED = frozenset({HOPS_METADATA, FORWARDED_METADATA, "user-agent", "te", "content-type"})
"""Metadata a forward never passes on: the entries it writes itself, and the transport's own."""
_OWN = "GRPC"
"""What the forward proof signs in the HTTP method's place."""


def _passed(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str | bytes]]:
    return [
        (k, v)
        for k, v in metadata
        if k not in _NOT_PASSED and not k.startswith(":") and not k.startswith("grpc-")
    ]


def _proof(secret: str, hops: int, method: str, owner: str, timestamp: str) -> str:
    """The HMAC of a forward, signed as ring RPCs are: the hop count in the nonce's place, the method path
    in the body's."""
    return sign(secret, _OWN, owner, timestamp, f"hops {hops}", method.encode("utf-8", "surrogatepass"))


def forwarded(secret: str, hops: int, method: str, owner: str) -> list[tuple[str, str]]:
    """The metadata of a call sent on to ``owner`` (its name among the routers' owners) for the
    ``hops``-th time: the hop count and the proof that a holder of ``secret`` chose ``owner``.

    A :class:`RoutingInterceptor` with a balancer and the same secret serves such a call itself;
    :class:`~balancer_grpc.balanced.BalancedChannel` sends it with ``secret=`` (``hops`` 1).
    """
    timestamp = str(int(time.time() * 1000))
    return [
        (HOPS_METADATA, str(hops)),
        (FORWARDED_METADATA, f"{timestamp}:{_proof(secret, hops, method, owner, timestamp)}"),
    ]


class _Refusal(Exception):
    """Why the router answers a call itself: a gRPC status, its details, and what to name it."""

    def __init__(self, code: grpc.StatusCode, kind: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.kind = kind
        self.details = details


def _hops(metadata: Mapping[str, str]) -> int:
    given = metadata.get(HOPS_METADATA)
    if given is None:
        return 0
    if not (given.isascii() and given.isdigit() and len(given) <= 3):
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            "BadRequestError",
            f"{HOPS_METADATA} must be a number of hops (0 to 999), got {given[:20]!r}",
        )
    return int(given)


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], refusal: _Refusal) -> NoReturn:
    await context.abort(refusal.code, refusal.details, ((ERROR_TYPE, refusal.kind),))
    raise AssertionError("abort returned")  # pragma: no cover - grpc's abort always raises


class RoutingInterceptor(grpc.aio.ServerInterceptor):
    """Routes calls to the owner of their key; see the module documentation.

    Exactly one of ``node`` (ownership from the ring) and ``balancer`` (ownership from bounded-load hashing
    over backend addresses, with calls in flight as the load) must be given.

    :param node: a ring node; the owner of a key is ``node.lookup(key).owner.address``.
    :param load_factor: with ``node``: balance over the ring's live members instead, with calls in flight
        as the load and this load factor; ``None``: route to the key's owner.
    :param balancer: a balancer whose node names are backend addresses (``host:port``).
    :param local: this server's own name among the owners (a ring node's address by default); a call it
        owns is served here. ``None`` with a balancer: every call is forwarded.
    :param target: the gRPC target of an owner's service, from its name (the name itself by default); with
        a ring, where the node's address is its ring port and the service listens elsewhere, map one to
        the other.
    :param request_key: the routing key from a unary request (see :data:`RequestKey`).
    :param timeout: seconds a forwarded call may take at most (less if the caller's deadline is nearer).
    :param max_hops: forwards allowed before a call is refused with ``ABORTED``.
    :param secret: shared by the servers that forward to each other; proves a forward. By default a ring
        node's cluster secret (or the key derived from its API token); ``None`` with a balancer: every
        server re-balances what it receives.
    :param max_skew: seconds a forward's proof stays good.
    :param credentials: TLS credentials of the channels to the owners (plain connections without).
    :param skip: method paths, or prefixes of them ending in ``/``, always served here (gRPC's own
        health and reflection services by default).
    """

    def __init__(
        self,
        *,
        node: Node | None = None,
        load_factor: float | str | Fraction | None = None,
        balancer: BoundedLoadBalancer | None = None,
        local: str | None = None,
        target: Callable[[str], str] = str,
        request_key: RequestKey | None = None,
        timeout: float = 30.0,
        max_hops: int = 2,
        secret: str | None = None,
        max_skew: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        skip: Collection[str] = ("/grpc.health.v1.Health/", "/grpc.reflection."),
    ) -> None:
        check_router(node, balancer, max_hops=max_hops, timeout=timeout, load_factor=load_factor)
        self.node = node
        self.balancer = balancer
        self.members = (
            MemberBalancer(node, load_factor=load_factor)
            if node is not None and load_factor is not None
            else None
        )
        """With ``node`` and ``load_factor``: the balancer over the ring's live members, else ``None``."""
        self.local = local
        self.target = target
        self.request_key = request_key
        self.timeout = timeout
        self.max_hops = max_hops
        self.secret = forward_secret(node, secret)
        self.max_skew = max_skew
        self.credentials = credentials
        self.skip = tuple(skip)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._wrapped: dict[str, tuple[tuple[Any, ...], grpc.RpcMethodHandler[Any, Any]]] = {}

    # -- ownership --------------------------------------------------------------------------------

    async def owner(self, key: str) -> str:
        """The name of the server that owns ``key`` now (for a balancer: without counting a load)."""
        balancer = self._balancer()
        if balancer is not None:
            return balancer.peek(key)
        assert self.node is not None
        return (await self.node.lookup(key)).owner.address

    def _balancer(self) -> BoundedLoadBalancer | None:
        if self.members is not None:
            self.members.start()  # follows the node's membership from the first call on
            if len(self.members.balancer):
                return self.members.balancer
        return self.balancer

    def _local(self) -> str | None:
        if self.local is not None or self.node is None:
            return self.local
        return self.node.address

    def _proven(self, metadata: Mapping[str, str], hops: int, method: str, local: str) -> bool:
        if self.secret is None:
            return False
        timestamp, _, proof = metadata.get(FORWARDED_METADATA, "").partition(":")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16 and proof.isascii()):
            return False
        if abs(time.time() - int(timestamp) / 1000) > self.max_skew:
            return False
        return hmac.compare_digest(_proof(self.secret, hops, method, local, timestamp), proof)

    @asynccontextmanager
    async def _placed(self, method: str, key: str, metadata: Mapping[str, str]) -> AsyncIterator[str | None]:
        """Where the call goes: ``None`` to serve it here, else the owner's name. With a balancer, one
        load is counted on the choice until the block ends, however it ends."""
        hops = _hops(metadata)
        local = self._local()
        balancer = self._balancer()
        if balancer is None:
            try:
                owner = await self.owner(key)
            except BalancerError as exc:
                raise _Refusal(
                    grpc.StatusCode.UNAVAILABLE, type(exc).__name__, f"no owner found for {key!r}: {exc}"
                ) from None
            yield None if owner == local else owner
            return
        if hops and local is not None and self._proven(metadata, hops, method, local):
            yield None  # the server that forwarded it chose this one, counting the load there
            return
        try:
            lease = Lease(key, balancer.acquire(key))
        except BalancerError as exc:
            raise _Refusal(grpc.StatusCode.UNAVAILABLE, type(exc).__name__, str(exc)) from None
        try:
            yield None if lease.node == local else lease.node
        finally:
            try:
                balancer.release(lease)
            except BalancerError:  # the node left the balancer meanwhile, and its loads with it
                log.debug("the lease %s was dropped with its node", lease)

    # -- forwarding -------------------------------------------------------------------------------

    def _channel(self, owner: str) -> grpc.aio.Channel:
        channel = self._channels.get(owner)
        if channel is None:
            target = self.target(owner)
            options = [("grpc.max_reconnect_backoff_ms", 2000), ("grpc.initial_reconnect_backoff_ms", 200)]
            channel = (
                grpc.aio.secure_channel(target, self.credentials, options=options)
                if self.credentials is not None
                else grpc.aio.insecure_channel(target, options=options)
            )
            self._channels[owner] = channel
        return channel

    def _forward_metadata(
        self, context: grpc.aio.ServicerContext[Any, Any], owner: str, hops: int, method: str
    ) -> list[tuple[str, str | bytes]]:
        if hops >= self.max_hops:
            raise _Refusal(
                grpc.StatusCode.ABORTED,
                "LoopDetected",
                f"call forwarded {hops} times already; not passing it on",
            )
        metadata = _passed(context.invocation_metadata() or ())
        if self.secret is not None:
            metadata += forwarded(self.secret, hops + 1, method, owner)
        else:
            metadata.append((HOPS_METADATA, str(hops + 1)))
        return metadata

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        return self.timeout if remaining is None else max(0.0, min(self.timeout, remaining))

    def _failed(self, owner: str, timeout: float, error: grpc.aio.AioRpcError) -> _Refusal | None:
        """The router's own answer to a forward that failed, or ``None`` to pass the owner's status back."""
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            log.info("forwarding to %s timed out after %g s", owner, timeout)
            return _Refusal(code, "GatewayTimeout", f"the owner {owner} did not answer within {timeout:g} s")
        if code == grpc.StatusCode.UNAVAILABLE:
            log.info("forwarding to %s failed: %s", owner, error.details())
            return _Refusal(code, "BadGateway", f"the owner {owner} cannot be reached: {error.details()}")
        return None

    # -- the interceptor --------------------------------------------------------------------------

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the call's handler so that it serves or forwards the call by its key."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or any(
            method == s or (s.endswith((".", "/")) and method.startswith(s)) for s in self.skip
        ):
            return handler
        # wrapped once per method: a service's generic handler usually makes an equal handler per call
        parts = _parts(handler)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] == parts:
            return cached[1]
        wrapped = _Routed(self, method, handler).handler()
        if len(self._wrapped) < _MAX_WRAPPED:
            self._wrapped[method] = (parts, wrapped)
        return wrapped

    async def aclose(self) -> None:
        """Close the channels to the owners and stop following the ring's members."""
        if self.members is not None:
            self.members.stop()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


_MAX_WRAPPED = 1024
"""Most methods whose wrapped handlers the interceptor keeps (a service has a fixed set of methods)."""


def _parts(handler: grpc.RpcMethodHandler[Any, Any]) -> tuple[Any, ...]:
    """What makes a handler: two handlers with equal parts (bound methods of one object compare equal)
    are served by the same wrapper."""
    return (
        handler.request_deserializer,
        handler.response_serializer,
        handler.unary_unary,
        handler.unary_stream,
        handler.stream_unary,
        handler.stream_stream,
    )


def _text(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {k: v for k, v in (metadata or ()) if isinstance(v, str)}


class _Forward:
    """One call on its way to its owner: the metadata it carries on, its deadline, the channel."""

    def __init__(
        self,
        router: RoutingInterceptor,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        owner: str,
        hops: int,
    ) -> None:
        self.router = router
        self.context = context
        self.method = method
        self.owner = owner
        self.metadata = router._forward_metadata(context, owner, hops, method)  # the loop guard first
        self.timeout = router._deadline(context)
        self.channel = router._channel(owner)

    def open(self, kind: str, request: Any) -> Any:
        """Make the call on the owner: ``kind`` is the multi-callable (``unary_unary``...), ``request``
        the request's bytes or the iterator of them."""
        multi: Any = getattr(self.channel, kind)(self.method)
        return multi(request, timeout=self.timeout, metadata=self.metadata)

    async def failed(self, error: grpc.aio.AioRpcError) -> NoReturn:
        """End the call as the forward failed: the router's own status, or the owner's passed back."""
        refusal = self.router._failed(self.owner, self.timeout, error)
        if refusal is not None:
            raise refusal
        await self.context.abort(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()))
        raise AssertionError("abort returned")  # pragma: no cover - grpc's abort always raises

    async def pass_back(self, call: Any) -> None:
        """The owner's trailing metadata, to the caller."""
        trailing = await call.trailing_metadata()
        if trailing:
            self.context.set_trailing_metadata(tuple(trailing))


class _Routed:
    """One method's handler, wrapped: it takes and gives bytes, and serves or forwards each call.

    A call without a key, or one this server owns, goes to the wrapped handler (its request deserialized
    and its answers serialized here, with the handler's own functions); any other is forwarded as bytes.
    """

    def __init__(
        self, router: RoutingInterceptor, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> None:
        self.router = router
        self.method = method
        self.inner = handler
        self.decode: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
        self.encode: Callable[[Any], bytes] = handler.response_serializer or (lambda answer: answer)

    def handler(self) -> grpc.RpcMethodHandler[Any, Any]:
        inner = self.inner
        if inner.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self.unary_unary)
        if inner.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self.unary_stream)
        if inner.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self.stream_unary)
        return grpc.stream_stream_rpc_method_handler(self.stream_stream)

    @asynccontextmanager
    async def _route(
        self, request: Any, unary: bool, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Forward | None]:
        """``None``: serve the call here; else the forward to its owner."""
        metadata = _text(context.invocation_metadata())
        key = None
        request_key = self.router.request_key
        if unary and request_key is not None:
            key = request_key(self.method, request)
        if key is None:
            key = metadata.get(KEY_METADATA)
        if key is None:
            yield None
            return
        async with self.router._placed(self.method, key, metadata) as owner:
            yield (
                None if owner is None else _Forward(self.router, context, self.method, owner, _hops(metadata))
            )

    async def _requests(self, raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for item in raw:
            yield self.decode(item)

    async def unary_unary(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        request = self.decode(raw)
        behaviour: Any = self.inner.unary_unary
        try:
            async with self._route(request, True, context) as forward:
                if forward is None:
                    return self.encode(await behaviour(request, context))
                call = forward.open("unary_unary", raw)
                try:
                    answer: bytes = await call
                except grpc.aio.AioRpcError as exc:
                    await forward.failed(exc)
                await forward.pass_back(call)
                return answer
        except _Refusal as refusal:
            await _refuse(context, refusal)

    async def unary_stream(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        request = self.decode(raw)
        behaviour: Any = self.inner.unary_stream
        try:
            async with self._route(request, True, context) as forward:
                if forward is None:
                    async for answer in behaviour(request, context):
                        yield self.encode(answer)
                    return
                async for item in self._forwarded(forward, forward.open("unary_stream", raw)):
                    yield item
        except _Refusal as refusal:
            await _refuse(context, refusal)

    async def stream_unary(
        self, raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        behaviour: Any = self.inner.stream_unary
        try:
            async with self._route(None, False, context) as forward:
                if forward is None:
                    return self.encode(await behaviour(self._requests(raw), context))
                call = forward.open("stream_unary", raw)
                try:
                    answer: bytes = await call
                except grpc.aio.AioRpcError as exc:
                    await forward.failed(exc)
                await forward.pass_back(call)
                return answer
        except _Refusal as refusal:
            await _refuse(context, refusal)

    async def stream_stream(
        self, raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        behaviour: Any = self.inner.stream_stream
        try:
            async with self._route(None, False, context) as forward:
                if forward is None:
                    async for answer in behaviour(self._requests(raw), context):
                        yield self.encode(answer)
                    return
                async for item in self._forwarded(forward, forward.open("stream_stream", raw)):
                    yield item
        except _Refusal as refusal:
            await _refuse(context, refusal)

    @staticmethod
    async def _forwarded(forward: _Forward, call: Any) -> AsyncIterator[bytes]:
        """The owner's streamed answers, as they come."""
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            await forward.failed(exc)
        finally:
            call.cancel()  # a no-op once it ended; stops the owner's stream if the caller left
        await forward.pass_back(call)
