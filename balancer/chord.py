"""Chord routing: finger table, successor list, predecessor; join, stabilize, notify, leave; lookups.

This is the corrected Chord of Zave ("Reasoning about identifier spaces", 2012/2017) rather than the
original paper's:

- a node joins through its successor only, and learns the rest by stabilization;
- stabilize adopts its successor's predecessor only after that node has answered, so a dead or
  half-joined node is never made a successor;
- a successor that fails is replaced from the successor list (length r), never left dangling, so the
  ring survives r - 1 adjacent failures.

With virtual nodes (:mod:`balancer.ring`), one process holds several ids, each a ``Chord`` of its own. A
successor list then names r distinct *processes*: the immediate successor first, then each next id whose
process is not named yet. Its first N entries are a key's replica set (N distinct processes), and the ring
survives r - 1 processes failing at once, however their ids are interleaved.

Lookups are iterative: the caller asks one node at a time for the closest node it knows that precedes the
id, so a dead hop costs one timeout and the next-closest candidate is tried. Every lookup reports its hop
count (the number of remote steps it took).

The class talks to peers only through the ``call`` function it is given (a transport's ``call``), so the
same code runs over aiohttp and over the in-process network of a simulation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from msgspec import Struct

from balancer import wire
from balancer.errors import (
    BalancerError,
    GoneError,
    IncompatibleConfigError,
    PeerUnreachableError,
    RingError,
)
from balancer.failure import FailureDetector
from balancer.keyspace import KeySpace, in_interval
from balancer.types import Handler, Lookup, NodeInfo, Payload, RingView, format_id

__all__ = ["Call", "Chord", "distinct"]

log = logging.getLogger(__name__)

Call = Callable[[str, str, Payload, float], Awaitable[Payload]]
"""``call(address, method, payload, timeout)``: a transport's client side."""


Answer = TypeVar("Answer", bound=Struct)


def _nodes(value: Iterable[wire.WireNode]) -> list[NodeInfo]:
    return [n.value() for n in value]


def distinct(nodes: Iterable[NodeInfo], limit: int) -> list[NodeInfo]:
    """``nodes`` in order without those whose process (address) appeared already, at most ``limit``."""
    seen: set[str] = set()
    kept: list[NodeInfo] = []
    for node in nodes:
        if node.address not in seen:
            seen.add(node.address)
            kept.append(node)
            if len(kept) == limit:
                break
    return kept


class Chord:
    """One ring member's routing state and the protocol steps that maintain it.

    ``info`` is this node, ``call`` the transport's client, ``settings`` the values every member of the
    ring must share (checked when a node joins). The maintenance steps (:meth:`stabilize`,
    :meth:`fix_fingers`, :meth:`check_predecessor`) are called periodically by the owner of the event
    loop (:class:`balancer.node.Node`), or directly by tests and simulations.
    """

    def __init__(
        self,
        info: NodeInfo,
        call: Call,
        *,
        space: KeySpace | None = None,
        successors: int = 8,
        timeout: float = 1.0,
        settings: dict[str, int | str] | None = None,
        successor_shortcut: bool = True,
        on_event: Callable[[str, NodeInfo], None] | None = None,
        detector: FailureDetector | None = None,
        finder: Callable[[int], Awaitable[Lookup]] | None = None,
        on_failed: Callable[[NodeInfo], None] | None = None,
    ) -> None:
        self.info = info
        self.space = space or KeySpace()
        self.r = successors
        self.timeout = timeout
        self.settings: dict[str, int | str] = settings or {"bits": self.space.bits}
        self.successor_shortcut = successor_shortcut
        self.predecessor: NodeInfo | None = None
        self.successors: list[NodeInfo] = [info]
        self.wraps = True
        """Whether the successor list came back around to this node: then it names every process."""
        self.contiguous = True
        """Whether the successor list skipped no id (every process met had one id so far): with
        ``wraps``, it is then the whole ring in order, and this node answers every lookup itself."""
        self.fingers: list[NodeInfo | None] = [None] * self.space.bits
        self.left = False
        self.detector = detector
        """Decides when a peer that missed a call is failed; without one, every miss is a failure."""
        self._call = call
        self._limits = wire.Limits(bits=self.space.bits)
        self._on_event = on_event or (lambda event, peer: None)
        self._find = finder or self.find_successor
        """How :meth:`fix_fingers` looks ids up: a process with virtual nodes looks up for all of them."""
        self._on_failed = on_failed or self.forget
        """Told of a peer declared failed: a process forgets all of that peer's ids, in every vnode."""
        self._on_predecessor: list[Callable[[NodeInfo | None, NodeInfo | None], None]] = []

    # -- the view ---------------------------------------------------------------------------------

    @property
    def successor(self) -> NodeInfo:
        """The first entry of the successor list (this node itself when it is alone)."""
        return self.successors[0]

    def view(self) -> RingView:
        """This node's view of the ring, as values."""
        distinct = list(dict.fromkeys(f for f in self.fingers if f is not None and f != self.info))
        return RingView(self.info, self.predecessor, tuple(self.successors), tuple(distinct))

    def owns(self, ident: int) -> bool:
        """Whether ``ident`` falls in ``(predecessor, self]``; true for everything while alone or unsure."""
        if self.predecessor is None:
            return self.successor == self.info
        return in_interval(ident, self.predecessor.id, self.info.id, self.space.size, right_closed=True)

    def on_predecessor_change(self, callback: Callable[[NodeInfo | None, NodeInfo | None], None]) -> None:
        """Call ``callback(old, new)`` whenever the predecessor changes (hand-off hangs off this)."""
        self._on_predecessor.append(callback)

    # -- joining and leaving ----------------------------------------------------------------------

    def create(self) -> None:
        """Start a new ring with this node as its only member."""
        self.predecessor = None
        self.successors = [self.info]
        self.wraps = True
        self.contiguous = True
        self.fingers = [None] * self.space.bits
        self.left = False

    async def join(self, bootstrap: str) -> Lookup:
        """Join the ring that the node at address ``bootstrap`` belongs to.

        Only the successor is set; stabilization does the rest. Raises
        :class:`IncompatibleConfigError` if the ring's settings differ from this node's, and
        :class:`PeerUnreachableError` or :class:`RingError` if the bootstrap node cannot place us.
        """
        answer = await self._ask(
            bootstrap,
            "chord.join",
            {"node": self.info.to_wire(), "settings": self.settings},
            wire.JoinAnswer,
            self.timeout * 8,
        )
        successors = _nodes(answer.successors)
        if not successors:
            raise RingError(f"{bootstrap} returned no successor")
        owner = successors[0]
        if owner.id == self.info.id and owner.address != self.info.address:
            raise RingError(
                f"id {format_id(self.info.id, self.space.bits)} is already taken by {owner.address}"
            )
        self.create()
        self._set_successors(owner, successors[1:])
        await self._notify(self.successor)
        with contextlib.suppress(BalancerError):  # one round now: learn the successor's own list at once
            await self.stabilize()
        return Lookup(owner, answer.hops, tuple(successors))

    async def leave(self) -> None:
        """Leave gracefully: tell the successor who its new predecessor is and the predecessor who its
        new successors are. The caller hands this node's keys over first.
        """
        self.left = True
        succ, pred = self.successor, self.predecessor
        message = {
            "node": self.info.to_wire(),
            "predecessor": pred.to_wire() if pred else None,
            "successors": [s.to_wire() for s in self.successors],
        }
        for peer in dict.fromkeys(p for p in (succ, pred) if p is not None and p != self.info):
            try:
                await self._call(peer.address, "chord.leaving", {**message, "to": peer.id}, self.timeout)
            except (PeerUnreachableError, GoneError):
                log.info("%s: %s did not hear that we leave", self.info, peer)

    # -- maintenance ------------------------------------------------------------------------------

    async def stabilize(self) -> None:
        """Verify the successor, adopt a closer one if the successor knows one, refresh the successor
        list from it, and notify it of this node.
        """
        if self.left:
            return
        for _ in range(self.r + 1):
            succ = self.successor
            if succ == self.info:
                state = wire.decode(wire.State, self._state(), self._limits)
                break
            try:
                state = await self._ask(succ.address, "chord.state", {}, wire.State, to=succ.id)
                break
            except GoneError:
                continue  # that id is gone (forgotten by _ask): ask the next successor
            except PeerUnreachableError as exc:
                if not self.unreachable(succ, exc):
                    return  # only suspect: keep it, and ask again next round
        else:
            return
        tail, contiguous = _nodes(state.successors), state.contiguous
        # Adopt the successor's predecessor only if it answers (Zave), never a dead or departed node.
        # Walking back up to r steps at once lets a node that lost its whole successor list, and fell
        # back to a far finger, find its true successor in one round instead of one node per round.
        for _ in range(self.r):
            candidate = state.predecessor.value() if state.predecessor is not None else None
            if (
                candidate is None
                or candidate == self.info
                or not in_interval(candidate.id, self.info.id, succ.id, self.space.size)
            ):
                break
            try:
                state = await self._ask(candidate.address, "chord.state", {}, wire.State, to=candidate.id)
            except (PeerUnreachableError, GoneError):
                break
            succ, tail, contiguous = candidate, _nodes(state.successors), state.contiguous
        self._set_successors(succ, tail, contiguous)
        if self.successor != self.info:
            await self._notify(self.successor)

    async def check_predecessor(self) -> None:
        """Forget the predecessor if it does not answer a ping."""
        pred = self.predecessor
        if pred is None or pred == self.info or self.left:
            return
        try:
            await self._ask(pred.address, "chord.ping", {}, wire.Ping, to=pred.id)
        except GoneError:
            pass  # forgotten by _ask
        except PeerUnreachableError as exc:
            self.unreachable(pred, exc)

    async def fix_fingers(self) -> int:
        """Refresh the whole finger table; returns the number of lookups it needed.

        Finger i is the successor of ``id + 2**i``. Consecutive fingers that fall before the previous
        answer reuse it, so a pass costs about log2(N) lookups instead of m.
        """
        if self.left:
            return 0
        lookups = 0
        previous = self.successor
        size = self.space.size
        for i in range(self.space.bits):
            start = self.space.finger_start(self.info.id, i)
            if in_interval(start, self.info.id, previous.id, size, right_closed=True):
                self.fingers[i] = previous
                continue
            try:
                previous = (await self._find(start)).owner
            except RingError:
                break
            lookups += 1
            self.fingers[i] = previous
        return lookups

    # -- lookups ----------------------------------------------------------------------------------

    async def find_successor(self, ident: int) -> Lookup:
        """The node that owns ``ident`` (its successor on the ring), found iteratively.

        Unreachable hops are forgotten and skipped. The owner is the one the ring names now: if it has
        just failed and the ring has not noticed yet, the next live entry of ``successors`` takes over
        its keys. Raises :class:`RingError` if no route is left.
        """
        done = self._answer(ident) or self._answer_locally(ident)
        if done is not None:
            return Lookup(done[0], 0, tuple(done))
        return await self.route(ident, self._closest_preceding(ident))

    async def route(
        self,
        ident: int,
        candidates: list[NodeInfo],
        on_done: Callable[[int | None, list[NodeInfo]], None] | None = None,
    ) -> Lookup:
        """The iterative part of a lookup of ``ident``: ask ``candidates`` (closest to ``ident`` first)
        and the closer nodes they name, one process at a time, until one knows the owner.

        ``on_done(after, successors)`` hears the final answer: every id in ``(after, owner]`` has that
        owner (``after`` is None when the answer did not say).
        """
        size = self.space.size
        tried: set[str] = set()
        dead: set[str] = set()
        # The last node that answered and its successor list: when its successor turns out dead, the
        # next live entry of that list owns what the dead one did (Zave's rule, applied by the caller).
        last, last_successors = self.info, list(self.successors)
        answer: wire.FindStepAnswer | None
        hops = 0
        path: list[str] = []  # the processes that answered, in order
        detector = self.detector
        while candidates and len(tried) < 4 * self.space.bits + self.r:
            node = candidates.pop(0)
            answer = None
            if detector is not None and node.address not in tried and detector.suspect(node.address):
                # only suspects are left to ask (they go last): if the last node that answered names a
                # live successor past the id, that one takes over, as for a dead hop, without waiting
                # on the suspect again (a slow peer costs one timeout, not one per lookup)
                alive = [
                    s for s in last_successors if s.address not in dead and not detector.suspect(s.address)
                ]
                if alive and in_interval(ident, last.id, alive[0].id, size, right_closed=True):
                    return Lookup(alive[0], hops, tuple(alive), tuple(path))
            if node.address not in tried:
                tried.add(node.address)
                try:
                    answer = await self._ask(
                        node.address, "chord.find_step", {"id": ident}, wire.FindStepAnswer
                    )
                except GoneError:
                    self.forget(node, "left")
                    dead.add(node.address)
                except PeerUnreachableError as exc:
                    self.unreachable(node, exc)
                    dead.add(node.address)
            if answer is None:
                alive = [s for s in last_successors if s.address not in dead]
                if (
                    node.address in dead
                    and alive
                    and in_interval(ident, last.id, alive[0].id, size, right_closed=True)
                ):
                    return Lookup(alive[0], hops, tuple(alive), tuple(path))
                continue
            hops += 1
            path.append(node.address)
            successors = _nodes(answer.successors)
            if answer.done and successors:
                if on_done is not None:
                    on_done(answer.after, successors)
                return Lookup(successors[0], hops, tuple(successors), tuple(path))
            # the answer's successors are those of its vnode ``after`` (the process's closest one to the
            # key), which may be another vnode of the process asked than ``node``
            anchor = node if answer.after is None else NodeInfo(answer.after, node.address)
            if (ident - anchor.id) % size < (ident - last.id) % size:  # only ever move toward the key
                last, last_successors = anchor, successors
            candidates = self.prefer_healthy(_nodes(answer.closer)) + candidates
        raise RingError(
            f"no route to the owner of {format_id(ident, self.space.bits)} from {self.info.address}"
        )

    def _answer(self, ident: int) -> list[NodeInfo] | None:
        """The owner of ``ident`` and the nodes after it if the owner is this node's successor, else None.

        When the ring has no more than r members the successor list wraps back to this node, which is
        then the last of the nodes after the owner.
        """
        if in_interval(ident, self.info.id, self.successor.id, self.space.size, right_closed=True):
            me = self.info.address
            if self.wraps and all(s.address != me for s in self.successors):
                return [*self.successors, self.info]
            return list(self.successors)
        return None

    def walk(self) -> list[NodeInfo]:
        """This node, then the processes after it: its replica walk. When the successor list wraps, the
        walk ends with the predecessor's process (the last one before this node), if no entry named it:
        a newcomer notifies its successor before the successor's list has caught up with it."""
        tail = [self.predecessor] if self.wraps and self.predecessor is not None else []
        return distinct([self.info, *self.successors, *tail], self.r + 1)

    def _answer_locally(self, ident: int) -> list[NodeInfo] | None:
        """The owner of ``ident`` and the processes after it, from this node's own state, when it knows
        them: ``ident`` is its own (between its predecessor and itself), or the successor list is the
        whole ring in order (it wraps around to this node and skipped no id), so every owner is known.
        """
        size = self.space.size
        if self.predecessor is not None and in_interval(
            ident, self.predecessor.id, self.info.id, size, right_closed=True
        ):
            return self.walk()
        if not (self.wraps and self.contiguous) or self.successor == self.info:
            return None
        ring = [self.info, *self.successors]
        for i, node in enumerate(ring):
            if in_interval(ident, ring[i - 1].id, node.id, size, right_closed=True):
                return ring[i:] + ring[:i]
        return None

    def _closest_preceding(self, ident: int) -> list[NodeInfo]:
        """Known nodes between this node and ``ident``, the closest to ``ident`` first, suspects last."""
        return self.prefer_healthy(self._preceding(ident))

    def _preceding(self, ident: int) -> list[NodeInfo]:
        """Known nodes strictly between this node and ``ident``, the closest to ``ident`` first."""
        known: Iterable[NodeInfo | None] = (
            [*self.fingers, *self.successors] if self.successor_shortcut else [*self.fingers, self.successor]
        )
        size = self.space.size
        me = self.info.id
        between = {n for n in known if n is not None and in_interval(n.id, me, ident, size)}
        return sorted(between, key=lambda n: (ident - n.id) % size)

    def prefer_healthy(self, nodes: list[NodeInfo]) -> list[NodeInfo]:
        """``nodes`` in the same order, except that suspected ones go last: a slow peer is asked only
        when no other will do, so it costs one timeout, not one per lookup."""
        detector = self.detector
        if detector is None:
            return nodes
        return sorted(nodes, key=lambda n: detector.suspect(n.address))  # stable: keeps the order

    # -- state changes ----------------------------------------------------------------------------

    def _state(self) -> Payload:
        return {
            "predecessor": self.predecessor.to_wire() if self.predecessor else None,
            "successors": [s.to_wire() for s in self.successors],
            "contiguous": self.contiguous,
        }

    def _set_successors(
        self, first: NodeInfo, tail: Iterable[NodeInfo], tail_contiguous: bool = False
    ) -> None:
        """Successor list = ``first``, then the nodes of ``tail`` (``first``'s own list) whose process is
        not named yet: r distinct processes at most, cut at this node itself.

        The walk stops where it comes back around to this node's position, even when this node itself
        is not in ``tail`` (its process was named already): an entry past that point is one that left.
        The list *wraps* (names every process of the ring) when it came back around or holds fewer
        than r processes: a walk stops short of r only there. It is *contiguous* (skipped no id) if
        ``first``'s was (``tail_contiguous``) and no id was skipped here.
        """
        fresh: list[NodeInfo] = []
        seen: set[str] = set()
        back, contiguous = False, tail_contiguous
        size, me, gone = self.space.size, self.info.id, 0
        for node in (first, *tail):
            ahead = (node.id - me) % size
            if ahead <= gone:  # back at (or past) this node: the walk went all the way around
                back = True  # (what follows would be behind this node: stale entries nobody cut)
                break
            gone = ahead
            if node.address in seen:
                contiguous = False
                continue  # another id of a process already named
            seen.add(node.address)
            fresh.append(node)
            if len(fresh) == self.r:
                break
        fresh = fresh or [self.info]
        self.wraps, self.contiguous = back or len(fresh) < self.r, contiguous
        old, self.successors = self.successors, fresh
        for node in fresh:
            if node not in old:
                self._on_event("joined", node)

    def _set_predecessor(self, node: NodeInfo | None) -> None:
        old = self.predecessor
        if old == node:
            return
        self.predecessor = node
        for callback in self._on_predecessor:
            callback(old, node)

    def forget(self, node: NodeInfo, event: str = "failed") -> None:
        """Drop every pointer to ``node`` (failed or departed); refill the successor list if emptied."""
        if node == self.info:
            return
        known = node in self.successors or node == self.predecessor or node in self.fingers
        self.fingers = [None if f == node else f for f in self.fingers]
        if self.detector is not None:
            self.detector.forget(node.address)
        if node in self.successors:
            # A list that named the whole ring still does without the member that failed or left, so
            # ``wraps`` stays: clearing it would make this node leave itself out of its own answers.
            self.successors = [s for s in self.successors if s != node]
            self.contiguous = False  # no longer the whole ring in order, if it was
            if not self.successors:  # every successor is gone: the nearest live finger, else ourselves
                self.successors = [self.info]
                ahead = self._preceding((self.info.id - 1) % self.space.size)  # the nearest one last
                healthy = [n for n in ahead if not (self.detector and self.detector.suspect(n.address))]
                self.successors = (healthy or ahead)[-1:] or [self.info]
                self.wraps = self.successors == [self.info]
        if node == self.predecessor:
            self._set_predecessor(None)
        if known:
            self._on_event(event, node)

    def forget_process(self, address: str, event: str = "failed") -> None:
        """Drop every pointer to any id of the process at ``address`` (its ids fail together)."""
        known = {n for n in (*self.successors, self.predecessor, *self.fingers) if n is not None}
        for node in sorted(n for n in known if n.address == address):
            self.forget(node, event)

    async def _notify(self, succ: NodeInfo) -> None:
        try:
            await self._ask(
                succ.address, "chord.notify", {"node": self.info.to_wire()}, wire.Empty, to=succ.id
            )
        except GoneError:
            pass  # forgotten by _ask
        except PeerUnreachableError as exc:
            self.unreachable(succ, exc)

    async def _ask(
        self,
        address: str,
        method: str,
        payload: Payload,
        answer: type[Answer],
        timeout: float | None = None,
        *,
        to: int | None = None,
    ) -> Answer:
        """Call ``method`` at ``address`` (for its vnode ``to``) and decode its answer as ``answer``.

        A vnode that is gone from there (:class:`GoneError`) is forgotten before the error is raised.
        """
        if to is not None:
            payload = {**payload, "to": to}
        try:
            result = await self._call(address, method, payload, timeout or self.timeout)
        except GoneError:
            if to is not None:
                self.forget(NodeInfo(to, address), "left")
            raise
        return wire.decode(answer, result, self._limits)

    def unreachable(self, node: NodeInfo, exc: PeerUnreachableError) -> bool:
        """A call to ``node`` failed: forget it if the failure detector declares it failed (always,
        without a detector). Returns whether it was forgotten; otherwise it is only suspected."""
        if self.detector is not None and not self.detector.failed(node.address):
            log.debug("%s: %s is suspected: %s", self.info, node, exc)
            return False
        self._on_failed(node)
        return True

    # -- RPC handlers -----------------------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The RPC methods this node serves, by name."""
        limits = self._limits
        return {
            "chord.ping": wire.serve(wire.Targeted, self._rpc_ping, limits),
            "chord.state": wire.serve(wire.Targeted, self._rpc_state, limits),
            "chord.notify": wire.serve(wire.Notify, self._rpc_notify, limits),
            "chord.find_step": wire.serve(wire.FindStep, self._rpc_find_step, limits),
            "chord.join": wire.serve(wire.Join, self._rpc_join, limits),
            "chord.leaving": wire.serve(wire.Leaving, self._rpc_leaving, limits),
        }

    def _check_serving(self) -> None:
        if self.left:
            raise GoneError(f"{self.info} has left the ring")

    async def _rpc_ping(self, message: wire.Targeted) -> Payload:
        self._check_serving()
        return {"id": self.info.id}

    async def _rpc_state(self, message: wire.Targeted) -> Payload:
        self._check_serving()
        return self._state()

    async def _rpc_notify(self, message: wire.Notify) -> Payload:
        self._check_serving()
        node = message.node.value()
        pred = self.predecessor
        if node != self.info and (
            pred is None or in_interval(node.id, pred.id, self.info.id, self.space.size)
        ):
            self._set_predecessor(node)
            self._on_event("joined", node)
            if self.successor == self.info:  # alone until now: the newcomer is also our successor
                self._set_successors(node, [], tail_contiguous=True)  # the ring is the two of us
        return {}

    async def _rpc_find_step(self, message: wire.FindStep) -> Payload:
        self._check_serving()
        ident = message.id
        done = self._answer(ident)
        if done is not None:
            return {"done": True, "successors": [s.to_wire() for s in done], "after": self.info.id}
        closer = self._closest_preceding(ident)
        return {
            "done": False,
            "closer": [n.to_wire() for n in closer],
            "successors": [s.to_wire() for s in self.successors],
            "after": self.info.id,
        }

    async def _rpc_join(self, message: wire.Join) -> Payload:
        self._check_serving()
        node, settings = message.node.value(), message.settings
        if settings != self.settings:
            raise IncompatibleConfigError(
                f"{node.address} has settings {settings!r}; this ring uses {self.settings!r}"
            )
        found = await self.find_successor(node.id)
        return {"successors": [s.to_wire() for s in found.successors], "hops": found.hops}

    async def _rpc_leaving(self, message: wire.Leaving) -> Payload:
        node = message.node.value()
        new_pred = message.predecessor.value() if message.predecessor is not None else None
        handover = [n for n in _nodes(message.successors) if n != node]
        was_successor = node == self.successor
        was_predecessor = node == self.predecessor
        self.forget(node, "left")
        if was_successor and handover:
            self._set_successors(handover[0], handover[1:], self.contiguous)
        if was_predecessor and new_pred is not None and new_pred != self.info:
            self._set_predecessor(new_pred)
        return {}
