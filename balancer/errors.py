"""Typed errors raised by balancer.

Every error derives from :class:`BalancerError`; most also derive from the built-in exception a caller
would reach for first, so ``except ValueError`` keeps working::

    BalancerError
     ├── ConfigError (ValueError)            a setting or argument is out of range or inconsistent
     ├── NoNodesError (LookupError)          a lookup on a balancer or ring with no members
     ├── UnknownNodeError (KeyError)         a node name that is not a member
     ├── NotAcquiredError (KeyError)         release of a key that holds no load
     └── CapacityError                       every eligible node is at its capacity
"""

from __future__ import annotations

__all__ = [
    "BalancerError",
    "CapacityError",
    "ConfigError",
    "NoNodesError",
    "NotAcquiredError",
    "UnknownNodeError",
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
