"""Signed inter-node RPCs: an HMAC-SHA256 over the method, the destination, a timestamp, a nonce and the body.

Pure functions and one small stateful guard, so any transport can sign and check the same way. A request
is accepted only if its signature matches, it names this node as its destination, its timestamp is within
``max_skew`` seconds of the receiver's clock and not older than the receiver's own start, and its nonce was
not seen within that window. So a captured request cannot be replayed to the node it was sent to (the
nonce), to any other node (the destination), or to the same node after a restart (the start time).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping

from balancer.errors import StaleRequestError, UnauthorizedError

__all__ = [
    "DESTINATION",
    "NONCE",
    "SIGNATURE",
    "TIMESTAMP",
    "ReplayGuard",
    "rpc_secret",
    "sign",
    "signed_headers",
]

DESTINATION = "X-Balancer-Destination"
TIMESTAMP = "X-Balancer-Timestamp"
NONCE = "X-Balancer-Nonce"
SIGNATURE = "X-Balancer-Signature"

# Lone surrogates (from bytes that are not UTF-8) still encode, so any header or path can be signed.
_ENCODING = ("utf-8", "surrogatepass")


def sign(secret: str, method: str, destination: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of one request under ``secret``.

    ``destination`` is the ``host:port`` the caller dials: a request signed for one node is refused by
    every other.
    """
    message = f"{method}\n{destination}\n{timestamp}\n{nonce}\n".encode(*_ENCODING) + body
    return hmac.new(secret.encode(*_ENCODING), message, hashlib.sha256).hexdigest()


def signed_headers(
    secret: str, method: str, destination: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The headers that sign a request for ``method`` at ``destination`` (``host:port``) with ``body``."""
    timestamp = str(int((time.time() if now is None else now) * 1000))
    nonce = secrets.token_hex(12)
    return {
        DESTINATION: destination,
        TIMESTAMP: timestamp,
        NONCE: nonce,
        SIGNATURE: sign(secret, method, destination, timestamp, nonce, body),
    }


def rpc_secret(cluster_secret: str | None, api_token: str | None) -> str | None:
    """The key that signs ring RPCs: the cluster secret, else one derived from the API token, else None.

    A node given only an API token still closes its RPC path: every member of a ring is given the same
    token, so a key derived from it is shared exactly by the members. The derivation keeps the token itself
    out of every signature. Anyone who holds the token can then also sign RPCs; a separate cluster secret
    keeps the two apart.
    """
    if cluster_secret:
        return cluster_secret
    if api_token:
        return hmac.new(api_token.encode(*_ENCODING), b"balancer ring RPC key", hashlib.sha256).hexdigest()
    return None


class ReplayGuard:
    """Checks signed requests for one receiver; remembers nonces for the skew window.

    :param secret: the key requests are signed with.
    :param max_skew: seconds a request's timestamp may differ from this clock.
    :param clock: wall-clock seconds (``time.time``); the guard's creation time is the node's start, and a
        request signed before it is refused.
    :param destinations: the ``host:port`` names this node answers as; :meth:`answer_as` adds more (a
        transport learns its port only once it listens).
    """

    def __init__(
        self,
        secret: str,
        max_skew: float = 30.0,
        clock: Callable[[], float] = time.time,
        destinations: Iterable[str] = (),
    ) -> None:
        self.secret = secret
        self.max_skew = max_skew
        self._clock = clock
        # timestamps travel in whole milliseconds, rounded down: compare at that resolution
        self.started = math.floor(clock() * 1000) / 1000
        self.destinations: set[str] = set(destinations)
        self._seen: dict[str, float] = {}

    def answer_as(self, *destinations: str) -> None:
        """Accept requests signed for each of ``destinations`` (``host:port``) from now on."""
        self.destinations.update(destinations)

    def check(self, method: str, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`UnauthorizedError` unless the request is signed for this node, fresh and new."""
        timestamp, nonce, signature = headers.get(TIMESTAMP), headers.get(NONCE), headers.get(SIGNATURE)
        destination = headers.get(DESTINATION)
        if not (timestamp and nonce and signature and destination):
            raise UnauthorizedError("the request is not signed with the cluster secret")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 16):
            raise UnauthorizedError("the request's timestamp is not a number of milliseconds")
        expected = sign(self.secret, method, destination, timestamp, nonce, body)
        # compare_digest refuses non-ASCII text with a TypeError; such a signature is simply wrong
        if not (signature.isascii() and hmac.compare_digest(expected, signature)):
            raise UnauthorizedError("the request's signature does not match the cluster secret")
        if destination not in self.destinations:
            names = " or ".join(map(repr, sorted(self.destinations))) or "no address yet"
            raise UnauthorizedError(
                f"the request was signed for {destination!r}, but this node answers as {names}"
            )
        now = self._clock()
        sent = int(timestamp) / 1000
        if abs(now - sent) > self.max_skew:
            raise UnauthorizedError(
                f"the request's timestamp is {now - sent:+.0f} s off (limit {self.max_skew:g} s)"
            )
        if sent < self.started:
            raise StaleRequestError(
                f"the request was signed {self.started - sent:.3f} s before this node started; "
                "a node never accepts what it may have accepted before a restart"
            )
        self._forget_before(now - 2 * self.max_skew)
        if nonce in self._seen:
            raise UnauthorizedError("the request was replayed")
        self._seen[nonce] = now

    def _forget_before(self, cutoff: float) -> None:
        """Drop nonces that arrived before ``cutoff``, oldest first, in time proportional to those dropped.

        A nonce that arrived at ``a`` was signed no earlier than ``a - max_skew``, so a replay of it is
        refused by the timestamp check after ``a + 2 * max_skew``: it need not be remembered longer.
        """
        seen = self._seen  # insertion order is arrival order
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] >= cutoff:
                break
            del seen[oldest]
