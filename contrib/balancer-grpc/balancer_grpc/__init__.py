"""gRPC for balancer: a ring transport, a server interceptor that routes calls to their key's owner, and a
client channel that balances calls by key with bounded loads.

- :class:`GrpcTransport` (``balancer node --transport grpc``): ring RPCs over gRPC; the public HTTP API on
  the port ``--set grpc.http_port=N``. Registered through the ``balancer`` entry-point group.
- :class:`RoutingInterceptor`: a ``grpc.aio.ServerInterceptor`` that serves a call here when this server
  owns its key, and forwards it to the owner otherwise (a ring :class:`~balancer.node.Node`, or a
  :class:`~balancer.bounded.BoundedLoadBalancer` over backends), with a hop-count loop guard.
- :class:`BalancedChannel`: calls go to the backend that bounded-load hashing picks for their key, with
  calls in flight as the load, and move on to the key's next candidate when a backend is unavailable.

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
    from balancer_grpc.balanced import BalancedChannel
    from balancer_grpc.routing import (
        FORWARDED_METADATA,
        HOPS_METADATA,
        KEY_METADATA,
        RoutingInterceptor,
    )
    from balancer_grpc.transport import GrpcSettings, GrpcTransport

__all__ = [
    "FORWARDED_METADATA",
    "HOPS_METADATA",
    "KEY_METADATA",
    "BalancedChannel",
    "GrpcSettings",
    "GrpcTransport",
    "RoutingInterceptor",
    "balancer_register_transports",
]

_LAZY = {
    "BalancedChannel": "balancer_grpc.balanced",
    "FORWARDED_METADATA": "balancer_grpc.routing",
    "HOPS_METADATA": "balancer_grpc.routing",
    "KEY_METADATA": "balancer_grpc.routing",
    "RoutingInterceptor": "balancer_grpc.routing",
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
