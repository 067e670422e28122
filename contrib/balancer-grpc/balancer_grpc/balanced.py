"""A client channel that sends each gRPC call to the backend that bounded-load hashing picks for its key.

:class:`BalancedChannel` is the gRPC counterpart of :class:`balancer.middleware.BalancedSession`. Its
backends are either named (``host:port`` gRPC targets, optionally with weights) or the live members of the
ring a :class:`~balancer.node.Node` sees, followed as they join and leave (with ``target`` mapping a
member's ring address to its service's target). A call names its key; the channel counts one load on the
backend :meth:`BoundedLoadBalancer.acquire <balancer.bounded.BoundedLoadBalancer.acquire>` picks for it,
from the moment the call is made until it completes, fails or is cancelled (for a streamed answer, until
the stream ends or the caller stops reading), so the load is the calls in flight. A backend that answers
``UNAVAILABLE`` (it cannot be reached, or says so) is skipped and the call made again on the key's next
candidate (the next backend of :meth:`~balancer.bounded.BoundedLoadBalancer.candidates` with room), at most
``retries`` times, within the call's one deadline. A streamed answer is retried only if it failed before
its first message.

Each call also carries its key as ``x-balancer-key`` metadata, so a server behind a
:class:`~balancer_grpc.routing.RoutingInterceptor` routes it by the same key. A client trusted with the
secret those servers share (``secret=``) also proves its choice, as a forwarding server does: the server
it chose serves the call instead of routing it again, so a call moved to the next candidate because its
first choice is down is served there (the servers' own balancers may still name the server that is down).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import grpc

from balancer.bounded import DEFAULT_LOAD_FACTOR, BoundedLoadBalancer, Lease
from balancer.errors import BalancerError, CapacityError, ConfigError
from balancer.middleware import MemberBalancer
from balancer_grpc.routing import FORWARDED_METADATA, HOPS_METADATA, KEY_METADATA, Metadata, forwarded

if TYPE_CHECKING:
    from fractions import Fraction

    from balancer.node import Node

__all__ = ["BalancedChannel", "BalancedUnaryStream", "BalancedUnaryUnary"]

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


def _release(balancer: BoundedLoadBalancer, lease: Lease) -> None:
    try:
        balancer.release(lease)
    except BalancerError:  # the backend left the balancer meanwhile, and its loads with it
        log.debug("the lease %s was dropped with its backend", lease)


class BalancedChannel:
    """Calls by key over bounded-load hashing of backends; an async context manager.

    Exactly one of ``backends`` and ``node`` must be given.

    :param backends: gRPC targets (``"10.0.0.1:50051"``), or a mapping of target to weight.
    :param node: a ring node whose live members are the backends (see
        :class:`~balancer.middleware.MemberBalancer`); until it has a view, a call goes to its key's owner.
    :param target: the gRPC target of a backend from its name in the balancer (the name itself by default).
    :param load_factor: the balancer's ``c``, in any form :func:`~balancer.bounded.parse_load_factor` reads.
    :param retries: calls made again on the key's next candidate, at most, after a retryable failure.
    :param retry_codes: the statuses that move a call to the next candidate (``UNAVAILABLE``).
    :param credentials: TLS credentials of every channel (plain connections without).
    :param options: gRPC channel options of every channel.
    :param secret: the secret the servers' routing interceptors share: each call carries the proof that
        a holder chose its backend (see :func:`~balancer_grpc.routing.forwarded`), so that backend serves
        it. The backends' names must then be the servers' ``local`` names.
    """

    def __init__(
        self,
        backends: Iterable[str] | Mapping[str, float] | None = None,
        *,
        node: Node | None = None,
        target: Callable[[str], str] = str,
        load_factor: float | str | Fraction = DEFAULT_LOAD_FACTOR,
        retries: int = 2,
        retry_codes: Collection[grpc.StatusCode] = (grpc.StatusCode.UNAVAILABLE,),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        secret: str | None = None,
    ) -> None:
        if (backends is None) == (node is None):
            raise ConfigError("give exactly one of backends= (static targets) and node= (a ring's members)")
        if retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {retries}")
        self.members = MemberBalancer(node, load_factor=load_factor) if node is not None else None
        """With ``node``: what follows the ring's live members (started on first use), else ``None``."""
        self.balancer = (
            self.members.balancer
            if self.members is not None
            else BoundedLoadBalancer(backends or (), load_factor=load_factor)
        )
        """The balancer that picks backends; its node names go through :attr:`target`."""
        self.target = target
        self.retries = retries
        self.retry_codes = frozenset(retry_codes)
        self.credentials = credentials
        self.options = list(options)
        self.secret = secret
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closed = False

    def channel(self, backend: str) -> grpc.aio.Channel:
        """The channel to ``backend`` (a name in the balancer), made on first use and kept."""
        if self._closed:
            raise RuntimeError("this balanced channel is closed")
        channel = self._channels.get(backend)
        if channel is None:
            target = self.target(backend)
            channel = (
                grpc.aio.secure_channel(target, self.credentials, options=self.options)
                if self.credentials is not None
                else grpc.aio.insecure_channel(target, options=self.options)
            )
            self._channels[backend] = channel
        return channel

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Request], bytes] | None = None,
        response_deserializer: Callable[[bytes], Response] | None = None,
    ) -> BalancedUnaryUnary[Request, Response]:
        """A callable for the unary method ``method`` (``"/pkg.Service/Method"``):
        ``await call(request, key="user:42", timeout=5)``."""
        return BalancedUnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Request], bytes] | None = None,
        response_deserializer: Callable[[bytes], Response] | None = None,
    ) -> BalancedUnaryStream[Request, Response]:
        """A callable for the server-streaming method ``method``:
        ``async for answer in call(request, key="user:42"): ...``."""
        return BalancedUnaryStream(self, method, request_serializer, response_deserializer)

    async def _first_choice(self, key: str) -> str | None:
        """With a ring node that has no view yet: the key's owner, as the ring says; else ``None``."""
        if self.members is None:
            return None
        self.members.start()
        if len(self.balancer):
            return None
        return (await self.members.node.lookup(key)).owner.address

    async def close(self) -> None:
        """Close every channel (calls in progress are cancelled) and stop following the ring's members."""
        self._closed = True
        if self.members is not None:
            self.members.stop()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> Self:
        if self.members is not None:
            self.members.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


_WRITTEN = frozenset({KEY_METADATA, HOPS_METADATA, FORWARDED_METADATA})
"""Metadata the channel writes itself: a caller's own entries of these names are dropped."""


class _Balanced(Generic[Request, Response]):
    def __init__(
        self,
        owner: BalancedChannel,
        method: str,
        request_serializer: Callable[[Request], bytes] | None,
        response_deserializer: Callable[[bytes], Response] | None,
    ) -> None:
        self.owner = owner
        self.method = method
        self.request_serializer = request_serializer
        self.response_deserializer = response_deserializer

    def _metadata(self, key: str, metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
        given = [(k, v) for k, v in metadata or () if k not in _WRITTEN]
        given.append((KEY_METADATA, key))
        return given

    def _sent(self, backend: str, metadata: list[tuple[str, str | bytes]]) -> list[tuple[str, str | bytes]]:
        """``metadata``, with the proof of the choice of ``backend`` when the channel has the secret."""
        if self.owner.secret is None:
            return metadata
        return [*metadata, *forwarded(self.owner.secret, 1, self.method, backend)]

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        return max(0.0, deadline - asyncio.get_running_loop().time())

    def _give_up(self, key: str, failed: list[str], last: grpc.aio.AioRpcError | None) -> BaseException:
        if last is not None:
            return last  # the last backend's own status: a gRPC client expects one
        return CapacityError(f"no backend left for {key!r}: tried {failed}")


class BalancedUnaryUnary(_Balanced[Request, Response]):
    """A unary method called by key over a :class:`BalancedChannel`."""

    async def __call__(
        self,
        request: Request,
        *,
        key: str,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Response:
        """Make the call on the backend chosen for ``key``; retried on the key's next candidate when a
        backend answers one of the channel's ``retry_codes``. Raises the last backend's
        :class:`grpc.aio.AioRpcError` when every try failed, :class:`~balancer.errors.CapacityError`
        when no backend was left to try, and :class:`~balancer.errors.NoNodesError` when there are no
        backends at all."""
        owner = self.owner
        sent = self._metadata(key, metadata)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        first = await owner._first_choice(key)
        if first is not None:
            multi = owner.channel(first).unary_unary(
                self.method, self.request_serializer, self.response_deserializer
            )
            return await multi(request, timeout=timeout, metadata=sent)
        balancer = owner.balancer
        failed: list[str] = []
        last: grpc.aio.AioRpcError | None = None
        for _ in range(owner.retries + 1):
            try:
                lease = Lease(key, balancer.acquire(key, exclude=failed))
            except CapacityError:  # every backend not tried yet is full, or none is left
                break
            try:
                multi = owner.channel(lease.node).unary_unary(
                    self.method, self.request_serializer, self.response_deserializer
                )
                return await multi(
                    request, timeout=self._remaining(deadline), metadata=self._sent(lease.node, sent)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in owner.retry_codes:
                    raise
                log.debug(
                    "%s failed on %s: %s; trying the next candidate", self.method, lease.node, exc.details()
                )
                failed.append(lease.node)
                last = exc
            finally:
                _release(balancer, lease)
        raise self._give_up(key, failed, last)


class BalancedUnaryStream(_Balanced[Request, Response]):
    """A server-streaming method called by key over a :class:`BalancedChannel`."""

    async def __call__(
        self,
        request: Request,
        *,
        key: str,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncGenerator[Response, None]:
        """The answers of the call made on the backend chosen for ``key``, as they arrive. The load is held
        until the stream ends or the caller stops reading (closing the iterator cancels the call)."""
        owner = self.owner
        sent = self._metadata(key, metadata)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        first = await owner._first_choice(key)
        if first is not None:
            multi = owner.channel(first).unary_stream(
                self.method, self.request_serializer, self.response_deserializer
            )
            only = multi(request, timeout=timeout, metadata=sent)
            try:
                async for answer in only:
                    yield answer
            finally:
                only.cancel()
            return
        balancer = owner.balancer
        failed: list[str] = []
        last: grpc.aio.AioRpcError | None = None
        for _ in range(owner.retries + 1):
            try:
                lease = Lease(key, balancer.acquire(key, exclude=failed))
            except CapacityError:
                break
            call: grpc.aio.UnaryStreamCall[Request, Response] | None = None
            started = False
            try:
                multi = owner.channel(lease.node).unary_stream(
                    self.method, self.request_serializer, self.response_deserializer
                )
                call = multi(
                    request, timeout=self._remaining(deadline), metadata=self._sent(lease.node, sent)
                )
                async for answer in call:
                    started = True
                    yield answer
                return
            except grpc.aio.AioRpcError as exc:
                if started or exc.code() not in owner.retry_codes:
                    raise
                failed.append(lease.node)
                last = exc
            finally:
                if call is not None:
                    call.cancel()  # a no-op once it ended; stops the backend's stream if the caller left
                _release(balancer, lease)
        raise self._give_up(key, failed, last)
