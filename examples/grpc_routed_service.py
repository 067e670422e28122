"""A gRPC service on three servers behind balancer-grpc's routing interceptor: each user's calls reach the
server that owns the user, whichever server they are sent to; a hot user's overflow spreads instead of
piling onto one server; and a client that balances by key itself skips a server that went down.

No generated code: the service is one generic handler with JSON messages. Needs the plugin package:
``pip install -e contrib/balancer-grpc``.

Run: python examples/grpc_routed_service.py
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import grpc
from balancer_grpc import BalancedChannel, RoutingInterceptor

from balancer import BoundedLoadBalancer

SECRET = "change me: shared by the servers only"
PROFILE = "/demo.Profiles/Get"


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def loads(data: bytes) -> Any:
    return json.loads(data)


class Profiles(grpc.GenericRpcHandler):
    """``/demo.Profiles/Get``: ``{"user": name}`` in, the profile and the server that served it out."""

    def __init__(self) -> None:
        self.name = "?"

    async def get(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await asyncio.sleep(0.01)  # some work, so that calls overlap
        return {"user": request["user"], "served_by": self.name}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method == PROFILE:
            return grpc.unary_unary_rpc_method_handler(
                self.get, request_deserializer=loads, response_serializer=dumps
            )
        return None


def user_of(method: str, request: Any) -> str | None:
    """The routing key: the user the request names."""
    return request.get("user") if isinstance(request, dict) else None


async def main() -> None:
    """Start three servers on loopback, call them through any of them, print who served."""
    servers: list[grpc.aio.Server] = []
    routers: list[RoutingInterceptor] = []
    services: list[Profiles] = []
    addresses: list[str] = []
    for _ in range(3):
        # each server balances on its own (calls in flight as the load); the shared secret lets the
        # server a call was forwarded to serve it instead of balancing it again
        router = RoutingInterceptor(
            balancer=BoundedLoadBalancer(load_factor=1.25), request_key=user_of, secret=SECRET
        )
        server = grpc.aio.server(interceptors=[router])
        service = Profiles()
        server.add_generic_rpc_handlers((service,))
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        router.local = service.name = address
        servers.append(server)
        routers.append(router)
        services.append(service)
        addresses.append(address)
    for router in routers:
        assert router.balancer is not None
        for address in addresses:
            router.balancer.add_node(address)
    for server in servers:
        await server.start()
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        get = [
            c.unary_unary(PROFILE, request_serializer=dumps, response_deserializer=loads) for c in channels
        ]
        owners = {}
        for user in ("ada", "grace", "alan", "edsger"):
            owners[user] = (await get[0]({"user": user}, timeout=10))["served_by"]
        print("owners:", owners)
        again = {user: (await get[2]({"user": user}, timeout=10))["served_by"] for user in owners}
        print("same owners through another server:", again == owners)

        async def hit(i: int) -> str:
            return str((await get[i % 3]({"user": "celebrity"}, timeout=10))["served_by"])

        spread = Counter(await asyncio.gather(*(hit(i) for i in range(90))))
        print("90 concurrent calls for one hot user were served by", len(spread), "servers")

        # a client that balances by key itself, trusted with the servers' secret: it proves its choice, so
        # the server it picked serves the call (no forwarding), and a server that is down is skipped
        async with BalancedChannel(addresses, load_factor=1.25, secret=SECRET) as balanced:
            profile = balanced.unary_unary(PROFILE, dumps, loads)
            direct = {
                user: (await profile({"user": user}, key=user, timeout=10))["served_by"] for user in owners
            }
            print("balanced client, same owners:", direct == owners)
            down = owners["ada"]
            await servers[addresses.index(down)].stop(None)
            answer = await profile({"user": "ada"}, key="ada", timeout=10)
            print("ada's server went down; ada served by another:", answer["served_by"] != down)
    finally:
        for channel in channels:
            await channel.close()
        for router in routers:
            await router.aclose()
        for server in servers:
            await server.stop(None)


if __name__ == "__main__":
    asyncio.run(main())
