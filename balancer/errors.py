"""Typed errors raised by balancer.

Every error derives from :class:`BalancerError`; most also derive from the built-in exception a caller
would reach for first, so ``except ValueError`` keeps working::

    BalancerError
     ├── ConfigError (ValueError)            a setting or argument is out of range or inconsistent
     ├── NoNodesError (LookupError)          a lookup on a balancer or ring with no members
     ├── UnknownNodeError (KeyError)         a node name that is not a member
     ├── NotAcquiredError (KeyError)         release of a key that holds no load
     ├── CapacityError                       every eligible node is at its capacity
     ├── PeerUnreachableError (ConnectionError)  a peer timed out, refused, or is known down
     ├── RemoteError                         a peer answered with an error of its own
     │    └── BadAnswerError                 what answered is not a balancer node (not JSON)
     ├── BadRequestError (ValueError)        a malformed request or RPC payload        -> 400
     │    └── ClockSkewError                 a record stamped too far ahead of our clock -> 400
     ├── KeyNotFoundError (KeyError)         the key has no live value                 -> 404
     ├── UnknownMethodError (LookupError)    an RPC method the node does not serve     -> 404
     ├── TooLargeError (ValueError)          a key or value over its size limit        -> 413
     ├── PluginError                         a plugin is missing or misbehaving
     ├── NotMemberError                      asked of a client what only a ring member has
     ├── StorageError                        the storage cannot be opened, read or written
     ├── UnauthorizedError                   a missing or bad HMAC, token or timestamp   -> 401
     │    └── StaleRequestError              signed before the receiver started           -> 401
     └── RingError                           join failed, node has left, no successor answers
          ├── IncompatibleConfigError        a joiner's settings differ from the ring's -> 409
          ├── GoneError                      that virtual node is not (or no longer) there -> 410
          └── QuorumError                    fewer replicas answered than the quorum    -> 503
               ├── CutOffError                this node sees only a minority of the ring -> 503
               └── ClockFencedError           this node's clock is too far from the ring's -> 503
"""

from __future__ import annotations

__all__ = [
    "BadAnswerError",
    "BadRequestError",
    "BalancerError",
    "CapacityError",
    "ClockFencedError",
    "ClockSkewError",
    "ConfigError",
    "CutOffError",
    "GoneError",
    "IncompatibleConfigError",
    "KeyNotFoundError",
    "NoNodesError",
    "NotAcquiredError",
    "NotMemberError",
    "PeerUnreachableError",
    "PluginError",
    "QuorumError",
    "RemoteError",
    "RingError",
    "StaleRequestError",
    "StorageError",
    "TooLargeError",
    "UnauthorizedError",
    "UnknownMethodError",
    "UnknownNodeError",
    "rebuild",
]


class BalancerError(Exception):
    """Base class of every error balancer raises on purpose."""


class ConfigError(BalancerError, ValueError):
    """A setting or argument is out of range or inconsistent with the others."""


class NoNodesError(BalancerError, LookupError):
    """A lookup was asked of a balancer or ring that has no members."""


class UnknownNodeError(BalancerError, KeyError):
    """A node name was given that is not a member."""

    def __init__(self, node: str) -> None:
        super().__init__(node)
        self.node = node

    def __str__(self) -> str:
        return f"unknown node: {self.node!r}"


class NotAcquiredError(BalancerError, KeyError):
    """A key was released that holds no load."""

    def __init__(self, key: object) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"key holds no load: {self.key!r}"


class CapacityError(BalancerError):
    """Every node the caller allowed is at its capacity (only possible when nodes are excluded)."""


class PeerUnreachableError(BalancerError, ConnectionError):
    """A peer did not answer within the timeout, refused the connection, or is known to be down.

    ``refused`` is true when nothing listens at the address (the connection was refused, or the node is
    known to be gone): the peer is down without doubt, not merely slow.
    """

    def __init__(self, address: str, reason: str = "unreachable", *, refused: bool = False) -> None:
        super().__init__(f"{address}: {reason}")
        self.address = address
        self.refused = refused


class RemoteError(BalancerError):
    """A peer answered a call with an error; ``kind`` names the error class it raised there."""

    def __init__(self, kind: str, message: str, status: int = 500) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status


class BadAnswerError(RemoteError):
    """What answered a call is not a balancer node: its answer is not balancer's JSON (an HTML page, say).

    A seed that answers this way is skipped, not waited for: it is up, and it is something else.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__("BadAnswer", f"HTTP {status} answer {detail}; is it a balancer node?", status)

    def __str__(self) -> str:
        return self.message


class BadRequestError(BalancerError, ValueError):
    """A request or RPC payload is malformed (HTTP 400)."""


class ClockSkewError(BadRequestError):
    """A record is stamped further ahead of the receiver's clock than ``max_clock_skew`` (HTTP 400)."""


class KeyNotFoundError(BalancerError, KeyError):
    """The key has no live value (HTTP 404)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"not found: {self.key}"


class TooLargeError(BalancerError, ValueError):
    """A key or value is over its configured size limit (HTTP 413)."""


class UnknownMethodError(BalancerError, LookupError):
    """An RPC named a method the node does not serve (HTTP 404)."""


class PluginError(BalancerError):
    """A plugin is missing, misnamed or misbehaving; ``plugin`` names it where one is known."""

    def __init__(self, message: str, plugin: object = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class NotMemberError(BalancerError):
    """Asked of a client (:class:`~balancer.client.RemoteNode`) what only a ring member has: its own
    records, its routing state, a ring to leave."""


class StorageError(BalancerError):
    """The storage cannot be used: its folder or database file is missing, unwritable or corrupt, or a
    read or write failed on disk. A node refuses to start on a storage that cannot be opened."""


class RingError(BalancerError):
    """The ring cannot do what was asked: joining failed, the node has left, or no successor answers."""


class IncompatibleConfigError(RingError):
    """A node tried to join a ring whose settings (id bits, protocol version) differ from its own."""


class GoneError(RingError):
    """The virtual node a ring RPC was meant for is not at that address: it left, or its process
    restarted with other ids (HTTP 410). The caller forgets it; the process itself may still be up."""


class QuorumError(RingError):
    """Fewer replicas answered than the quorum needs; the operation may have reached some (HTTP 503)."""

    def __init__(self, operation: str, answered: int, needed: int) -> None:
        super().__init__(f"{operation} quorum not reached: {answered} of {needed} replicas answered")
        self.operation = operation
        self.answered = answered
        self.needed = needed


class CutOffError(QuorumError):
    """This node sees no majority of the ring's members up (it is on the minority side of a partition,
    or most members fell silent within ``partition_memory``), or it is merging rings after a partition
    (or back from a long pause) and has not synced yet; it serves no reads or writes meanwhile (HTTP 503)."""

    def __init__(self, up: int, members: int, *, rejoining: bool = False) -> None:
        RingError.__init__(
            self,
            "this node is syncing with the ring again (after a partition, or a pause long enough for the "
            "ring to move on without it), and serves no reads or writes until it has synced"
            if rejoining
            else f"this node sees {up} of {members} ring members up, no majority: it may be cut off from "
            "the rest, and serves no reads or writes until it sees a majority again",
        )
        self.operation = "any"
        self.answered = up
        self.needed = members // 2 + 1


class ClockFencedError(QuorumError):
    """This node's clock is further from the ring's than the fence's bound (``FENCE_FRACTION`` of
    ``max_clock_skew``), measured against a majority of the processes it reaches: it stamps no versions
    and serves no reads or writes until its clock is back within the bound (HTTP 503). At join, the
    joiner's clock measured against the ring's through its seed; the join is refused.

    ``ahead`` is how many seconds its clock is ahead of the ring's (negative: behind), ``error`` the
    measurement's error bound and ``bound`` the fence's bound, all in seconds.
    """

    def __init__(self, message: str, *, ahead: float = 0.0, error: float = 0.0, bound: float = 0.0) -> None:
        RingError.__init__(self, message)
        self.operation = "any"
        self.answered = 0
        self.needed = 0
        self.ahead = ahead
        self.error = error
        self.bound = bound


class UnauthorizedError(BalancerError, PermissionError):
    """A request lacks a valid signature, token or timestamp (HTTP 401); nothing was changed."""


class StaleRequestError(UnauthorizedError):
    """A signed request is older than the receiver's start (HTTP 401): it may be a replay from before a
    restart. A sender whose clock is a little behind a node that just started gets it too; a freshly
    signed request, a moment later, passes."""


_REBUILT: tuple[type[BalancerError], ...] = (
    BadRequestError,
    ClockFencedError,
    ClockSkewError,
    ConfigError,
    IncompatibleConfigError,
    GoneError,
    RingError,
    TooLargeError,
    UnknownMethodError,
    UnauthorizedError,
    StaleRequestError,
)


def rebuild(kind: str, message: str, status: int = 500) -> BalancerError:
    """The error a peer answered with (its class name ``kind`` and its message), raised again on this
    side as the same class where it can be rebuilt from the message alone, else as :class:`RemoteError`."""
    if kind == "KeyNotFoundError":
        return KeyNotFoundError(message.removeprefix("not found: "))
    cls = next((c for c in _REBUILT if c.__name__ == kind), None)
    return cls(message) if cls is not None else RemoteError(kind, message, status)
