"""gRPC for balancer: a ring transport.

- :class:`GrpcTransport` (``balancer node --transport grpc``): ring RPCs over gRPC; the public HTTP API on
  the port ``--set grpc.http_port=N``. Registered through the ``balancer`` entry-point group.

This module stays light: a node that loads the plugin but runs another transport never imports grpc.
The names above are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from balancer.hookspecs import TransportFactory, hookimpl

if TYPE_CHECKING:
    from balancer.config import Config
    from balancer.hookspecs import Transport
    from balancer_grpc.transport import GrpcSettings, GrpcTransport

__all__ = [
    "GrpcSettings",
    "GrpcTransport",
    "balancer_register_transports",
]

_LAZY = {
    "GrpcSettings": "balancer_grpc.transport",
    "GrpcTransport": "balancer_grpc.transport",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


@hookimpl
def balancer_register_transports(register: Callable[[str, TransportFactory], None]) -> None:
    """Register ``grpc``; its setting is ``grpc.http_port``, the port of the public HTTP API (see
    :class:`GrpcSettings`)."""

    def make(config: Config) -> Transport:
        from balancer_grpc.transport import GrpcTransport

        return GrpcTransport(config)

    register("grpc", make)
