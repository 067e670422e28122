"""Signed inter-node RPCs: an HMAC-SHA256 over the method, a timestamp, a nonce and the body.

Pure functions and one small stateful guard, so any transport can sign and check the same way. A request
is accepted only if its signature matches, its timestamp is within ``max_skew`` seconds of the receiver's
clock, and its nonce was not seen within that window (a replay is refused even with a valid signature).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

from balancer.errors import UnauthorizedError

__all__ = ["NONCE", "SIGNATURE", "TIMESTAMP", "ReplayGuard", "sign", "signed_headers"]

TIMESTAMP = "X-Balancer-Timestamp"
NONCE = "X-Balancer-Nonce"
SIGNATURE = "X-Balancer-Signature"


def sign(secret: str, method: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of one request under ``secret``."""
    message = f"{method}\n{timestamp}\n{nonce}\n".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(secret: str, method: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The headers that sign a request for ``method`` with ``body``."""
    timestamp = str(int((time.time() if now is None else now) * 1000))
    nonce = secrets.token_hex(12)
    return {TIMESTAMP: timestamp, NONCE: nonce, SIGNATURE: sign(secret, method, timestamp, nonce, body)}


class ReplayGuard:
    """Checks signed requests for one receiver; remembers nonces for the skew window."""

    def __init__(self, secret: str, max_skew: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.secret = secret
        self.max_skew = max_skew
        self._clock = clock
        self._seen: dict[str, float] = {}

    def check(self, method: str, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`UnauthorizedError` unless the request is signed, fresh and not a replay."""
        timestamp, nonce, signature = headers.get(TIMESTAMP), headers.get(NONCE), headers.get(SIGNATURE)
        if not (timestamp and nonce and signature):
            raise UnauthorizedError("the request is not signed with the cluster secret")
        expected = sign(self.secret, method, timestamp, nonce, body)
        if not hmac.compare_digest(expected, signature):
            raise UnauthorizedError("the request's signature does not match the cluster secret")
        now = self._clock()
        try:
            sent = int(timestamp) / 1000
        except ValueError:
            raise UnauthorizedError("the request's timestamp is not a number") from None
        if abs(now - sent) > self.max_skew:
            raise UnauthorizedError(
                f"the request's timestamp is {now - sent:+.0f} s off (limit {self.max_skew:g} s)"
            )
        self._forget_before(now - self.max_skew)
        if nonce in self._seen:
            raise UnauthorizedError("the request was replayed")
        self._seen[nonce] = sent

    def _forget_before(self, cutoff: float) -> None:
        if len(self._seen) > 1024:
            self._seen = {n: t for n, t in self._seen.items() if t >= cutoff}
