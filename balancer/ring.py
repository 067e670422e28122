"""The virtual nodes of one process, routed as one ring member.

A process holds several ring ids (``--vnodes``, scaled by ``--weight``); each is a full
:class:`~balancer.chord.Chord` participant with its own predecessor, successor list and fingers. This
module puts them behind one address:

- **One RPC surface.** Requests for one vnode (``chord.state``, ``chord.notify``, ``chord.ping``,
  ``chord.leaving``) name it with ``to``; an id that is not here answers :class:`GoneError` (it left, or
  the process restarted with other ids), and the caller forgets it.
- **No network inside the process.** A call from one vnode to another of the same process runs the
  handler directly; only calls to other processes reach the transport.
- **Lookups use everything the process knows.** An id whose owner some local vnode knows (its own
  range, its successor's, or a range learned from a recent lookup) is answered without a message;
  otherwise the walk starts from the closest node any local vnode knows of. A remote step is answered
  the same way, so a hop is one network message to one process.
- **Bounded maintenance.** One task stabilizes the vnodes at once: their calls to the same process in
  the same turn travel as one ``chord.batch`` message, and a round takes only the vnodes whose
  neighbours are among :data:`NEIGHBOURS_PER_ROUND` processes (round robin), so a round costs at most
  two messages to each of eight processes however many vnodes there are. Finger tables are refreshed
  one vnode per round, round robin.
- **A process fails as a whole.** When a peer is declared failed, every local vnode forgets every id of
  that peer's process at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from balancer import errors, wire
from balancer.batching import Batcher
from balancer.chord import Call, Chord, distinct
from balancer.errors import BalancerError, GoneError, IncompatibleConfigError
from balancer.failure import FailureDetector
from balancer.keyspace import KeySpace, in_interval
from balancer.types import Handler, Lookup, NodeInfo, Payload, format_id

__all__ = ["BATCHED", "NEIGHBOURS_PER_ROUND", "Ring"]

log = logging.getLogger(__name__)

BATCHED = frozenset({"chord.state", "chord.notify", "chord.ping"})
"""Maintenance calls that share one ``chord.batch`` message with others to the same process."""

_CLOSER = 32  # most closer nodes one find step names


def _outcome(result: Payload) -> Payload | BalancerError:
    """One call's result in a batch answer: its answer, or the error it raised there, rebuilt."""
    if "ok" in result:
        return result["ok"]  # type: ignore[no-any-return]
    kind, message = result.get("error") or ("RemoteError", "a batched call has no result")
    return errors.rebuild(str(kind), str(message))


def _batches(calls: list[tuple[str, Payload]]) -> list[list[tuple[str, Payload]]]:
    """A turn's calls cut into messages a peer accepts (``wire.Batch`` carries at most 1,024)."""
    return [calls[i : i + 1024] for i in range(0, len(calls), 1024)]


NEIGHBOURS_PER_ROUND = 8
"""Most other processes one maintenance round of a process sends to (stabilize: a state and a notify
message to each; check_predecessor: one ping message to each). With more vnodes than that, the round
robin visits every vnode within a few rounds."""


class Ring:
    """The vnodes of the process at ``address``, with ids ``ids`` (the first is the process's first
    vnode, whose id names the process in logs and stamps its writes), and what they share.

    ``call`` is the transport's client (monitored by ``detector``); the other arguments are those of
    :class:`~balancer.chord.Chord`. ``route_ttl`` is how long a range learned from a lookup is trusted
    (ranges are also forgotten at once when this process sees the ring change).
    """

    def __init__(
        self,
        address: str,
        ids: Sequence[int],
        call: Call,
        *,
        space: KeySpace,
        successors: int = 8,
        timeout: float = 1.0,
        settings: dict[str, int | str] | None = None,
        detector: FailureDetector | None = None,
        on_event: Callable[[str, NodeInfo], None] | None = None,
        weight: float = 1.0,
        route_ttl: float = 2.0,
    ) -> None:
        self.address = address
        self.space = space
        self.r = successors
        self.timeout = timeout
        self.settings: dict[str, int | str] = settings or {"bits": space.bits}
        self.detector = detector
        self.weight = weight
        self.route_ttl = route_ttl
        self.left = False
        self._remote = call
        self._on_event = on_event or (lambda event, peer: None)
        self._limits = wire.Limits(bits=space.bits)
        self.vnodes = [
            Chord(
                NodeInfo(ident, address),
                self.call,
                space=space,
                successors=successors,
                timeout=timeout,
                settings=self.settings,
                on_event=self._event,
                detector=detector,
                finder=self.find_successor,
                on_failed=self._failed,
            )
            for ident in sorted(set(ids))
        ]
        for vnode in self.vnodes:  # a new predecessor moves a range: what was learned may be stale
            vnode.on_predecessor_change(lambda old, new: self._changed())
        if not self.vnodes:
            raise ValueError("a process holds at least one id")
        self.ids = [v.info.id for v in self.vnodes]
        self._by_id = {v.info.id: v for v in self.vnodes}
        self.first = self._by_id[ids[0]]
        self._handlers = self.handlers()
        self._batchers: dict[str, Batcher[tuple[str, Payload], Payload | BalancerError]] = {}
        self._known: list[NodeInfo] = []  # every remote node some vnode points to, by id
        self._known_ids: list[int] = []
        self._known_dirty = True
        self._route_ends: list[int] = []  # learned ranges (start, end] by end, and their successors
        self._routes: dict[int, tuple[int, tuple[NodeInfo, ...]]] = {}
        self._routes_until = 0.0
        self._map_ids: list[int] = []  # the whole ring, from a settled survey (see adopt_map)
        self._map_nodes: list[NodeInfo] = []
        self._map_processes = 0
        self.epoch = 0
        """Counts the changes this process has seen; a survey's map is taken only if none happened."""
        self._next_fingers = 0
        self._cursors: dict[str, int] = {}  # where the next round of each kind starts
        self._settling: asyncio.Future[int] | None = None

    # -- the view ---------------------------------------------------------------------------------

    @property
    def info(self) -> NodeInfo:
        """The process's first vnode: its id stamps the versions this process writes."""
        return self.first.info

    @property
    def successors(self) -> list[NodeInfo]:
        """The other processes this one's vnodes name first in their successor lists (one id each)."""
        firsts = [s for v in self.vnodes for s in v.successors if s.address != self.address]
        return distinct(firsts, self.r)

    def vnode(self, ident: int | None) -> Chord:
        """The local vnode with id ``ident`` (the first without one); :class:`GoneError` if none."""
        if self.left:
            raise GoneError(f"{self.address} has left the ring")
        if ident is None:
            return self.first
        found = self._by_id.get(ident)
        if found is None:
            raise GoneError(f"{self.address} holds no virtual node {format_id(ident, self.space.bits)}")
        return found

    def pointed(self) -> set[str]:
        """The other processes some local vnode points to (predecessor, successors, fingers)."""
        return {
            n.address
            for v in self.vnodes
            for n in (v.predecessor, *v.successors, *v.fingers)
            if n is not None and n.address != self.address
        }

    # -- calls ------------------------------------------------------------------------------------

    async def call(self, address: str, method: str, payload: Payload, timeout: float) -> Payload:
        """Call ``method`` at ``address``: directly if it is this process, batched with the other
        maintenance calls of this turn if it is one of :data:`BATCHED`, else through the transport."""
        if address == self.address:
            handler = self._handlers.get(method)
            if handler is None:
                raise errors.UnknownMethodError(f"unknown method {method!r}")
            return await handler(payload)
        if method not in BATCHED:
            return await self._remote(address, method, payload, timeout)
        batcher = self._batchers.get(address)
        if batcher is None:
            batcher = self._batchers[address] = Batcher(
                functools.partial(self._send_calls, address), _batches
            )
        result = await batcher.submit((method, payload))
        if isinstance(result, BalancerError):
            raise result
        return result

    async def _send_calls(
        self, address: str, calls: list[tuple[str, Payload]]
    ) -> list[Payload | BalancerError]:
        """One turn's maintenance calls to ``address``: alone as themselves, several as a batch."""
        if len(calls) == 1:
            method, payload = calls[0]
            return [await self._remote(address, method, payload, self.timeout)]
        message = {"calls": [[method, payload] for method, payload in calls]}
        answer = await self._remote(address, "chord.batch", message, self.timeout)
        results = wire.decode(wire.BatchAnswer, answer, self._limits).results
        return [_outcome(result) for result in results]

    # -- lookups ----------------------------------------------------------------------------------

    def _preceding_vnode(self, ident: int) -> Chord:
        """The local vnode closest before ``ident`` (strictly; the circle wraps)."""
        return self.vnodes[(bisect.bisect_left(self.ids, ident) - 1) % len(self.vnodes)]

    def _local_answer(self, ident: int, learned: bool = True) -> tuple[int, list[NodeInfo]] | None:
        """``(after, successors)`` if this process knows the owner of ``ident`` without asking:
        ``successors`` start with the owner, and every id in ``(after, owner]`` has the same owner."""
        index = bisect.bisect_left(self.ids, ident)
        owner = self.vnodes[index % len(self.vnodes)]  # the first local vnode at or after ident
        pred = owner.predecessor
        size = self.space.size
        if pred is not None and in_interval(ident, pred.id, owner.info.id, size, right_closed=True):
            return pred.id, owner.walk()
        before = self.vnodes[(index - 1) % len(self.vnodes)]
        done = before._answer(ident)
        if done is not None:
            return before.info.id, done
        if learned and self._map_ids:
            return self._map_answer(ident)
        if learned and self._route_ends:
            if time.monotonic() > self._routes_until:
                self.forget_routes()
                return None
            end = self._route_ends[bisect.bisect_left(self._route_ends, ident) % len(self._route_ends)]
            start, nodes = self._routes[end]
            if in_interval(ident, start, end, size, right_closed=True):
                return start, list(nodes)
        return None

    def _learn(self, after: int | None, successors: list[NodeInfo]) -> None:
        if after is None or not successors:
            return
        end = successors[0].id
        if not self._routes:
            self._routes_until = time.monotonic() + self.route_ttl
        if end not in self._routes:
            bisect.insort(self._route_ends, end)
        self._routes[end] = (after, tuple(successors))

    def forget_routes(self) -> None:
        """Drop every range learned from lookups (they expired, or the ring changed)."""
        self._routes.clear()
        self._route_ends.clear()

    def adopt_map(self, owners: dict[int, str], epoch: int) -> bool:
        """Answer lookups from ``owners`` (every id of the ring and its process, from a survey that
        found the ring settled) until the ring changes. Only a ring of at most r processes is taken:
        there every process is in every successor list, so every change reaches every process and drops
        the map at once. ``epoch`` is :attr:`epoch` when the survey started; a change since then makes
        the map stale, and it is not taken. Returns whether it was."""
        if epoch != self.epoch or len(set(owners.values())) > self.r or not owners:
            return False
        self._map_ids = sorted(owners)
        self._map_nodes = [NodeInfo(i, owners[i]) for i in self._map_ids]
        self._map_processes = len(set(owners.values()))
        return True

    def _map_answer(self, ident: int) -> tuple[int, list[NodeInfo]]:
        ids, nodes = self._map_ids, self._map_nodes
        index = bisect.bisect_left(ids, ident)
        count = len(ids)
        walk = (nodes[(index + k) % count] for k in range(count))  # stops once every process is named
        return ids[(index - 1) % count], distinct(walk, min(self.r + 1, self._map_processes))

    def _closest_preceding(self, ident: int, limit: int = _CLOSER) -> list[NodeInfo]:
        """Remote nodes any local vnode knows, strictly between the closest local vnode before
        ``ident`` and ``ident``, the closest to ``ident`` first, suspects last."""
        if self._known_dirty:
            known = {
                n
                for v in self.vnodes
                for n in (*v.fingers, *v.successors, v.predecessor)
                if n is not None and n.address != self.address
            }
            self._known = sorted(known)
            self._known_ids = [n.id for n in self._known]
            self._known_dirty = False
        start = self._preceding_vnode(ident).info.id
        size = self.space.size
        found: list[NodeInfo] = []
        index = bisect.bisect_left(self._known_ids, ident)
        for step in range(1, len(self._known) + 1):
            node = self._known[(index - step) % len(self._known)]
            if not in_interval(node.id, start, ident, size):
                break
            found.append(node)
            if len(found) == limit:
                break
        return self.prefer_healthy(found)

    async def find_successor(self, ident: int, *, fresh: bool = False) -> Lookup:
        """The node that owns ``ident`` and the processes after it, with the network messages it took.

        ``fresh`` ignores ranges learned from earlier lookups (a joining node must not be placed by a
        stale answer). Raises :class:`~balancer.errors.RingError` if no route is left.
        """
        local = self._local_answer(ident, learned=not fresh)
        if local is not None:
            successors = local[1]
            return Lookup(successors[0], 0, tuple(successors))
        start = self._preceding_vnode(ident)
        return await start.route(ident, self._closest_preceding(ident), self._learn)

    def prefer_healthy(self, nodes: list[NodeInfo]) -> list[NodeInfo]:
        """``nodes`` in the same order, except that suspected processes go last."""
        return self.vnodes[0].prefer_healthy(nodes)

    # -- failures and departures ------------------------------------------------------------------

    def unreachable(self, node: NodeInfo, exc: errors.PeerUnreachableError) -> bool:
        """A call to ``node`` failed: forget its whole process if the failure detector declares it
        failed. Returns whether it was forgotten; otherwise it is only suspected."""
        return self.vnodes[0].unreachable(node, exc)

    def forget(self, node: NodeInfo, event: str = "failed") -> None:
        """Forget every id of ``node``'s process, in every local vnode."""
        if node.address == self.address:
            return
        self._batchers.pop(node.address, None)
        for vnode in self.vnodes:
            vnode.forget_process(node.address, event)
        self._changed()

    def _failed(self, node: NodeInfo) -> None:
        self.forget(node, "failed")

    def _event(self, event: str, peer: NodeInfo) -> None:
        self._changed()
        if peer.address != self.address:  # siblings linking up are not news to anyone
            self._on_event(event, peer)

    def _changed(self) -> None:
        """The ring changed here: what was learned about it, and the whole-ring map, may be stale."""
        self._known_dirty = True
        self.forget_routes()
        self._map_ids, self._map_nodes = [], []
        self.epoch += 1

    # -- joining, maintenance, leaving ------------------------------------------------------------

    def create(self) -> None:
        """Start a new ring of this process's vnodes alone, linked to each other in id order."""
        for vnode in self.vnodes:
            vnode.create()
        if len(self.vnodes) > 1:
            for vnode, after in zip(self.vnodes, [*self.vnodes[1:], self.vnodes[0]], strict=True):
                vnode._set_successors(after.info, [])
                after._set_predecessor(vnode.info)
        self._changed()

    async def join(self, bootstrap: str) -> Lookup:
        """Join every vnode through the process at ``bootstrap``; returns the first vnode's lookup.

        Then the neighbouring processes are asked to settle (:meth:`settle`) and this one settles too,
        so that when this returns, the processes around the newcomer name it in their successor lists
        and a quorum right after a join counts it, as a single-id Chord node's successor does at once.
        """
        first: Lookup | None = None
        for vnode in self.vnodes:
            found = await vnode.join(bootstrap)
            first = first or found
            self._changed()
        assert first is not None
        neighbours = {
            n.address
            for v in self.vnodes
            for n in (v.predecessor, *v.successors)
            if n is not None and n.address != self.address
        }
        for address in sorted(neighbours):
            try:
                await self._remote(address, "ring.settle", {}, self.timeout * 4)
            except BalancerError as exc:
                log.debug("%s: %s did not settle: %s", self.info, address, exc)
        await self.settle()
        return first

    async def reunite(self, address: str) -> bool:
        """Merge with the ring of the process at ``address``, which this one declared failed: after a
        partition heals, each side is a ring of its own, and stabilization alone never brings them
        together. Each local vnode looks its own id up in that ring and takes the answer as its successor
        if it lies closer than the current one; stabilization then interleaves the two rings (the caller
        runs :meth:`settle` when it is ready for the view to change). Returns whether any successor
        changed. Raises :class:`PeerUnreachableError` if ``address`` does not
        answer, :class:`IncompatibleConfigError` if its ring's settings differ.
        """
        changed = False
        for vnode in self.vnodes:
            raw = await self._remote(
                address,
                "chord.join",
                {"node": vnode.info.to_wire(), "settings": self.settings},
                self.timeout * 4,
            )
            found = [n.value() for n in wire.decode(wire.JoinAnswer, raw, self._limits).successors]
            found = [n for n in found if n.address != self.address]
            if found and in_interval(found[0].id, vnode.info.id, vnode.successor.id, self.space.size):
                vnode._set_successors(found[0], found[1:])
                changed = True
        if changed:
            log.info("%s: merged with the ring of %s", self.info, address)
            self._changed()
        return changed

    async def settle(self) -> int:
        """Stabilize every vnode, round after round, until a round changes no successor list or
        predecessor (at most r rounds); returns the rounds run. Concurrent callers share the rounds."""
        if self._settling is not None:
            return await asyncio.shield(self._settling)
        self._settling = asyncio.ensure_future(self._settle())
        try:
            return await asyncio.shield(self._settling)
        finally:
            self._settling = None

    async def _settle(self) -> int:
        for rounds in range(1, self.r + 1):
            before = [(v.predecessor, tuple(v.successors)) for v in self.vnodes]
            with contextlib.suppress(BalancerError):
                await self.stabilize(every=True)
            if before == [(v.predecessor, tuple(v.successors)) for v in self.vnodes]:
                return rounds
        return self.r

    async def stabilize(self, *, every: bool = False) -> None:
        """Stabilize vnodes at once (their calls to one process share a message): those whose successor
        is this process or one of :data:`NEIGHBOURS_PER_ROUND` other processes, taken round robin, so a
        round costs a bounded number of messages however many vnodes there are; ``every`` vnode when
        asked (joining, settling)."""
        try:
            chosen = self.vnodes if every else self._round(lambda v: v.successor, "stabilize")
            await self._each(lambda v: v.stabilize(), chosen)
        finally:
            self._known_dirty = True

    async def check_predecessor(self) -> None:
        """Check vnodes' predecessors, as many as :meth:`stabilize` takes (pings to one process share a
        message)."""
        await self._each(lambda v: v.check_predecessor(), self._round(lambda v: v.predecessor, "ping"))

    def _round(self, neighbour: Callable[[Chord], NodeInfo | None], cursor: str) -> list[Chord]:
        """The vnodes of this round: from where the last round of this kind stopped, every vnode whose
        ``neighbour`` is local, missing, or at a process already chosen, until NEIGHBOURS_PER_ROUND
        processes are chosen; the first vnode left out starts the next round."""
        count = len(self.vnodes)
        start = self._cursors.get(cursor, 0)
        chosen: list[Chord] = []
        processes: set[str] = set()
        resume = start
        for k in range(count):
            vnode = self.vnodes[(start + k) % count]
            peer = neighbour(vnode)
            if peer is not None and peer.address != self.address and peer.address not in processes:
                if len(processes) == NEIGHBOURS_PER_ROUND:
                    resume = (start + k) % count
                    break
                processes.add(peer.address)
            chosen.append(vnode)
        self._cursors[cursor] = resume
        return chosen

    async def fix_fingers(self) -> int:
        """Refresh one vnode's finger table (round robin); returns the lookups it needed."""
        vnode = self.vnodes[self._next_fingers % len(self.vnodes)]
        self._next_fingers += 1
        lookups = await vnode.fix_fingers()
        self._known_dirty = True
        return lookups

    async def fix_all(self) -> int:
        """Refresh every vnode's finger table (a process that just joined); returns the lookups."""
        lookups = 0
        for vnode in self.vnodes:
            lookups += await vnode.fix_fingers()
        self._known_dirty = True
        return lookups

    async def _each(self, step: Callable[[Chord], Awaitable[object]], vnodes: Sequence[Chord]) -> None:
        results = await asyncio.gather(*(step(v) for v in vnodes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise failures[0]

    async def leave(self) -> None:
        """Leave with every vnode, one after the other: each tells its neighbours, siblings included,
        so the next one to leave already names the right ones."""
        for vnode in self.vnodes:
            await vnode.leave()
        self.left = True

    # -- RPC handlers -----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods of the ring, served for every local vnode, by name."""
        limits = self._limits
        return {
            "chord.ping": wire.serve(wire.Targeted, self._rpc_ping, limits),
            "chord.state": wire.serve(wire.Targeted, self._rpc_state, limits),
            "chord.notify": wire.serve(wire.Notify, self._rpc_notify, limits),
            "chord.leaving": wire.serve(wire.Leaving, self._rpc_leaving, limits),
            "chord.find_step": wire.serve(wire.FindStep, self._rpc_find_step, limits),
            "chord.join": wire.serve(wire.Join, self._rpc_join, limits),
            "chord.batch": wire.serve(wire.Batch, self._rpc_batch, limits),
            "ring.settle": wire.serve(wire.Empty, self._rpc_settle, limits),
        }

    async def _rpc_settle(self, message: wire.Empty) -> Payload:
        self.vnode(None)  # GoneError once left
        return {"rounds": await self.settle()}

    async def _rpc_ping(self, message: wire.Targeted) -> Payload:
        return await self.vnode(message.to)._rpc_ping(message)

    async def _rpc_state(self, message: wire.Targeted) -> Payload:
        return await self.vnode(message.to)._rpc_state(message)

    async def _rpc_notify(self, message: wire.Notify) -> Payload:
        return await self.vnode(message.to)._rpc_notify(message)

    async def _rpc_leaving(self, message: wire.Leaving) -> Payload:
        answer = await self.vnode(message.to)._rpc_leaving(message)
        self._changed()
        return answer

    async def _rpc_find_step(self, message: wire.FindStep) -> Payload:
        self.vnode(None)  # GoneError once left
        ident = message.id
        local = self._local_answer(ident, learned=False)
        if local is not None:
            after, successors = local
            return {"done": True, "successors": [s.to_wire() for s in successors], "after": after}
        start = self._preceding_vnode(ident)
        return {
            "done": False,
            "closer": [n.to_wire() for n in self._closest_preceding(ident)],
            "successors": [s.to_wire() for s in start.successors],
            "after": start.info.id,
        }

    async def _rpc_join(self, message: wire.Join) -> Payload:
        self.vnode(None)
        node, settings = message.node.value(), message.settings
        if settings != self.settings:
            differ = sorted(k for k in {*settings, *self.settings} if settings.get(k) != self.settings.get(k))
            raise IncompatibleConfigError(
                f"{node.address} has settings {settings!r}; this ring uses {self.settings!r} "
                f"(they differ in {', '.join(differ)})"
            )
        found = await self.find_successor(node.id, fresh=True)
        return {"successors": [s.to_wire() for s in found.successors], "hops": found.hops}

    async def _rpc_batch(self, message: wire.Batch) -> Payload:
        results: list[Payload] = []
        for method, payload in message.calls:
            handler = self._handlers.get(method) if method in BATCHED else None
            try:
                if handler is None:
                    raise errors.UnknownMethodError(f"{method!r} cannot be batched")
                results.append({"ok": await handler(payload)})
            except BalancerError as exc:
                results.append({"error": [type(exc).__name__, str(exc)]})
        return {"results": results}
