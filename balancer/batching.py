"""Requests to one peer made in the same turn of the event loop, sent as one message.

Used by the key-value service (reads and writes of many clients waiting on one replica) and by the ring
(maintenance calls of many vnodes to one process).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from balancer.errors import BadRequestError

__all__ = ["Batcher"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Requests to one peer made in the same turn of the event loop travel in one RPC.

    Under load many client requests wait on the same replica at once; one message for all of them
    spreads the cost of an HTTP request over the batch. A lone request goes out on the next turn, alone.
    ``send(items)`` makes the RPC and returns one result per item; ``split`` cuts a turn's items into
    messages of bounded size, keeping their order and cutting only between them.
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[list[Result]]],
        split: Callable[[list[Item]], list[list[Item]]] = lambda items: [items],
    ) -> None:
        self._send = send
        self._split = split
        self._pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def submit(self, item: Item) -> asyncio.Future[Result]:
        """A future for ``item``'s result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((item, future))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        start = 0
        for chunk in self._split([item for item, _ in pending]):
            futures = [future for _, future in pending[start : start + len(chunk)]]
            start += len(chunk)
            task = asyncio.ensure_future(self._deliver(chunk, futures))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _deliver(self, items: list[Item], futures: list[asyncio.Future[Result]]) -> None:
        try:
            results = await self._send(items)
            if len(results) != len(items):
                raise BadRequestError("a batched answer does not have one result per request")
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
