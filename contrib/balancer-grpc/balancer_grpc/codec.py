"""What the gRPC transport puts on the wire: payloads as msgpack, signatures and errors as metadata.

No protobuf: every ring RPC is one gRPC method, ``/balancer.Ring/<method>`` (``/balancer.Ring/chord.notify``),
whose request and answer are the payload encoded with msgpack (the same encoding as the ``stream``
transport's frames). A payload reaches a handler only as a map with string keys and no msgpack extension
types, as JSON could carry it; :mod:`balancer.wire` then checks its shape as for every transport.

Metadata (gRPC lowercases names):

- signed calls carry :data:`SIGNED`: ``x-balancer-destination``, ``x-balancer-timestamp``,
  ``x-balancer-nonce`` and ``x-balancer-signature``, the fields :func:`balancer.auth.signed_headers`
  makes for an HTTP RPC, over the method name and the msgpack body;
- an error answer carries, as trailing metadata, :data:`ERROR_TYPE` (the balancer error's class name) and
  :data:`ERROR_STATUS` (its HTTP status, as the HTTP path would answer), with the message as the gRPC
  status details; the caller raises the same balancer error (:func:`balancer.errors.rebuild`).

A gRPC status without those entries came from gRPC itself, not from a handler: :func:`raise_for` maps it
(``UNAVAILABLE`` and ``DEADLINE_EXCEEDED`` to :class:`~balancer.errors.PeerUnreachableError`, a message over
the size limit to :class:`~balancer.errors.TooLargeError`, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import msgspec

from balancer import errors
from balancer.auth import DESTINATION, NONCE, SIGNATURE, TIMESTAMP
from balancer.errors import BalancerError
from balancer.hookspecs import Payload
from balancer.plugins.aiohttp_transport import status_for

__all__ = [
    "ERROR_STATUS",
    "ERROR_TYPE",
    "SERVICE",
    "SIGNED",
    "code_for",
    "decode_answer",
    "decode_request",
    "encode",
    "error_trailers",
    "method_path",
    "raise_for",
    "refused",
]

SERVICE = "balancer.Ring"
"""The gRPC service every ring RPC belongs to: ``/balancer.Ring/<method>``."""

SIGNED: dict[str, str] = {name.lower(): name for name in (DESTINATION, TIMESTAMP, NONCE, SIGNATURE)}
"""The metadata names of a signed call, each mapped to the header name :mod:`balancer.auth` checks."""

ERROR_TYPE = "x-balancer-error"
"""Trailing metadata of an error answer: the class name of the balancer error the handler raised."""
ERROR_STATUS = "x-balancer-status"
"""Trailing metadata of an error answer: the HTTP status the HTTP path answers that error with."""

_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    410: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def method_path(method: str) -> str:
    """The gRPC method path of the ring RPC ``method``."""
    return f"/{SERVICE}/{method}"


def _no_extensions(code: int, data: memoryview) -> Any:
    raise msgspec.DecodeError(f"msgpack extension type {code} is not part of the protocol")


encode = msgspec.msgpack.Encoder().encode
"""A payload (or an answer) as msgpack bytes."""
_maps = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_no_extensions).decode


def decode_request(body: bytes) -> Payload:
    """The payload of a request; raises :class:`~balancer.errors.BadRequestError` for anything but a
    msgpack map with string keys and JSON's kinds of values."""
    try:
        return _maps(body)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested past the C stack
        raise errors.BadRequestError(f"a request is a msgpack map: {exc}") from None


def decode_answer(body: bytes) -> Payload:
    """The payload of an answer; raises :class:`~balancer.errors.BadAnswerError` for anything else."""
    try:
        return _maps(body)
    except (msgspec.DecodeError, RecursionError):
        raise errors.BadAnswerError(200, f"is not a msgpack map ({len(body)} bytes)") from None


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code answering ``exc``: from its HTTP status (:func:`status_for`), with
    :class:`~balancer.errors.UnknownMethodError` as ``UNIMPLEMENTED``; ``INTERNAL`` for a balancer error
    of status 500 and ``UNKNOWN`` for any other exception."""
    if isinstance(exc, errors.UnknownMethodError):
        return grpc.StatusCode.UNIMPLEMENTED
    if not isinstance(exc, BalancerError):
        return grpc.StatusCode.UNKNOWN
    return _CODES.get(status_for(exc), grpc.StatusCode.INTERNAL)


def error_trailers(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """What an error answer carries: its code, its details (the message) and its trailing metadata."""
    if isinstance(exc, BalancerError):
        kind, message = type(exc).__name__, str(exc)
    else:
        kind, message = "InternalError", f"{type(exc).__name__}: {exc}"
    trailers = ((ERROR_TYPE, kind), (ERROR_STATUS, str(status_for(exc))))
    return code_for(exc), message, trailers


def refused(details: str) -> bool:
    """Whether gRPC's details of a failed call say the connection was refused (nothing listens)."""
    return "connection refused" in details.lower()


def _text(metadata: Iterable[tuple[str, str | bytes]] | None) -> Mapping[str, str]:
    return {k: v for k, v in (metadata or ()) if isinstance(v, str)}


def raise_for(address: str, error: grpc.aio.AioRpcError) -> BalancerError:
    """The balancer error a failed call to ``address`` stands for (returned, for the caller to raise).

    An answer with :data:`ERROR_TYPE` is the handler's own error, rebuilt as its class where
    :func:`balancer.errors.rebuild` can; anything else is gRPC's: no answer in time or no connection
    (:class:`~balancer.errors.PeerUnreachableError`, ``refused`` when nothing listens), a message over a
    size limit (:class:`~balancer.errors.TooLargeError`), a method the server does not serve (it is no
    balancer node on this transport: :class:`~balancer.errors.UnknownMethodError`).
    """
    code, details = error.code(), error.details() or ""
    trailers = _text(error.trailing_metadata())
    kind = trailers.get(ERROR_TYPE)
    if kind is not None:
        status = trailers.get(ERROR_STATUS, "500")
        return errors.rebuild(kind, details, int(status) if status.isdigit() and len(status) <= 3 else 500)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.PeerUnreachableError(address, "timed out")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return errors.PeerUnreachableError(address, details or code.name, refused=refused(details))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.TooLargeError(f"{address}: {details}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return errors.UnknownMethodError(f"{address} does not serve it over gRPC: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.UnauthorizedError(f"{address}: {details}")
    return errors.RemoteError(code.name, details, 500)
