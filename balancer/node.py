"""A ring member: Chord routing, the key-value service and the plugins, wired together on one event loop.

``Node`` is the public entry point for applications on the ring::

    async with Node(Config(port=9001)) as first:               # creates a ring
        async with Node(Config(port=9002), join=first.address) as second:
            await second.put("greeting", b"hello")
            assert await first.get("greeting") == b"hello"
            found = await first.lookup("greeting")             # owner and hop count

Leaving the ``async with`` block leaves the ring gracefully (keys are handed to the successor first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import pluggy

from balancer import wire
from balancer.chord import Call, Chord
from balancer.config import PROTOCOL_VERSION, Config
from balancer.errors import (
    BadAnswerError,
    BadRequestError,
    BalancerError,
    ClockFencedError,
    ConfigError,
    CutOffError,
    GoneError,
    IncompatibleConfigError,
    KeyNotFoundError,
    PeerUnreachableError,
    QuorumError,
    RemoteError,
    RingError,
    StaleRequestError,
    TooLargeError,
    UnauthorizedError,
    UnknownMethodError,
)
from balancer.failure import FailureDetector
from balancer.hookspecs import Handler, Payload, PublicApi, Route, Storage, Transport
from balancer.keyspace import KeySpace
from balancer.kv import KVService
from balancer.plugin import Registry, plugin_manager
from balancer.ring import Ring
from balancer.skew import CLOCKED, FENCE_FRACTION, Fence, PeerClocks, Skew, fenced_error, wall_clock
from balancer.survey import RingStatus, status_of, survey
from balancer.types import Lookup, Member, NodeInfo, Record, RingView, format_id
from balancer.vnodes import allocate_ids, derived_ids, vnode_count

__all__ = ["Node"]

log = logging.getLogger(__name__)

STALL_TICK = 0.25
"""Seconds between the checks that this process has been running (see ``Node._stall_watch``)."""
REJOIN_AFTER = 6
"""RPC timeouts a stall must last for this node to resync before it serves clients again."""
VIEW_REUSE = 0.5
"""Seconds a ``GET /ring`` survey's result answers later requests (see :meth:`Node.ring_view`)."""


class Node(PublicApi):
    """One member of a balancer ring; an async context manager.

    ``join`` is the address (``host:port``) of any member of an existing ring, or several such seeds,
    tried in order until one answers; without it the node creates a new ring. With ``create_if_alone``
    the node creates a ring when no seed answers (a first node restarting after its peers moved on, for
    example); otherwise that is an error.

    ``transport`` and ``storage`` may be given as objects (tests, simulations);
    otherwise the plugins named in ``config`` make them. ``pm`` is the plugin manager to use (a new one
    with the built-in plugins, plus entry points if ``config.load_entrypoints``, by default).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        join: str | Sequence[str] | None = None,
        create_if_alone: bool = False,
        pm: pluggy.PluginManager | None = None,
        transport: Transport | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.config = config or Config()
        self.seeds = [join] if isinstance(join, str) else list(join or [])
        self.create_if_alone = create_if_alone
        self.bootstrap: str | None = None
        """The seed the node joined through (None: it created the ring)."""
        self.pm = pm or plugin_manager(load_entrypoints=self.config.load_entrypoints)
        self.registry = Registry(self.pm)
        self.space = KeySpace(self.config.bits)
        self.transport = transport or self.registry.transport(self.config)
        self.storage = storage or self.registry.storage(self.config)
        self.strategy = self.registry.replication(self.config)
        self._handlers: dict[str, Handler] = {}
        self._routes: list[Route] = []
        # skip the per-operation hook call entirely when no plugin implements it
        self._observing = bool(self.pm.hook.balancer_kv_operation.get_hookimpls())
        self._tasks: list[asyncio.Task[None]] = []
        self._random = random.Random(self.config.seed)
        self._membership_changed = asyncio.Event()
        self._ring: Ring | None = None
        self._call: Call = self.transport.call
        self._limits = wire.Limits(bits=self.config.bits)
        self.member = False
        """Whether this node has created or joined its ring (and not left it)."""
        self._survey_due = asyncio.Event()
        self._departed: set[str] = set()  # processes that said they left: not listed as down
        self._heard: dict[str, str] = {}  # the last ring event reported to the hooks, by process
        self._placing = asyncio.Lock()
        self._pending: dict[str, tuple[list[int], float, float]] = {}  # placed lately: ids, weight, until
        self.detector = FailureDetector(self.config.rpc_timeout, self.config.phi_threshold)
        """Round-trip times and suspicion of every peer this node calls (see :mod:`balancer.failure`)."""
        self.wall = wall_clock(self.config.clock_offset, self.config.clock_drift)
        """This node's wall clock (seconds since the epoch): what it stamps versions and answers with."""
        self.clocks = PeerClocks(FENCE_FRACTION * self.config.max_clock_skew, wall=self.wall)
        """Clock offsets of the peers, measured from the ring's round trips (see :mod:`balancer.skew`)."""
        self.fence = Fence(self.clocks, on_lifted=self._fence_lifted)
        """Whether this node is fenced for its clock (see :mod:`balancer.skew`)."""
        self._kv: KVService | None = None
        self._members: tuple[Member, ...] = ()
        # processes this node declared failed (by silence or refusal) and has not found in its ring since,
        # with when (monotonic): tried again by _reuniter, and counted by _check_majority
        self._lost: dict[str, float] = {}
        self._rejoining = False  # merged rings, or back from a minority, and not settled since
        self._view_survey: asyncio.Future[Payload] | None = None  # the GET /ring survey under way
        self._last_view: tuple[float, Payload] | None = None  # (loop time, view) of the last one
        self.started = False
        self.stopped = False

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self, *, on_join_wait: Callable[[list[str], int, int], None] | None = None) -> Self:
        """Serve, then create or join the ring, then start the maintenance loops.

        Seeds that do not answer yet are tried again with backoff for ``config.join_timeout`` seconds
        (one pass only with ``create_if_alone``); ``on_join_wait(seeds, attempt, attempts)`` is called
        after each pass that found none of them up. A seed that answers but is not a balancer node is
        skipped. Raises :class:`~balancer.errors.ConfigError` if a seed is this node's own address,
        :class:`~balancer.errors.IncompatibleConfigError` or :class:`~balancer.errors.UnauthorizedError`
        at once if the ring refuses this node's settings or credentials, and
        :class:`~balancer.errors.PeerUnreachableError` (one seed) or :class:`RingError` (several) if no
        seed answered in time; the node is closed again in every case.
        """
        if self.started:
            return self
        self.started = True
        self.pm.hook.balancer_http_routes(node=self, register=self._routes.append)
        port = await self.transport.serve(self.config.host, self.config.port, self._handlers, api=self)
        address = f"{self.config.advertised}:{port}"
        self._call = self.clocks.monitor(self.detector.monitor(self.transport.call))
        self.fence.name = address
        self._handlers["node.status"] = self._rpc_status
        self._handlers["ring.describe"] = self._clocked(self._rpc_describe)
        self._handlers["ring.place"] = self._rpc_place
        # Until this node is a ring member, a joiner asking it must wait, not take it for a ring of one.
        self._handlers["chord.join"] = self._refuse_join
        try:
            await self._join_or_create(address, on_join_wait)
        except BaseException:
            await self.close()
            raise
        ring = self.ring
        self._handlers["chord.join"] = ring.handlers()["chord.join"]
        self.member = True
        try:
            await self.ring_status()
        except BalancerError as exc:
            log.info("%s: the first survey of the ring failed: %s", ring.info, exc)
        self._tasks = [
            asyncio.create_task(self._every(self.config.stabilize_interval, ring.stabilize)),
            asyncio.create_task(
                self._every(self.config.fix_fingers_interval, ring.fix_fingers, ring.fix_all)
            ),
            asyncio.create_task(self._every(self.config.check_predecessor_interval, ring.check_predecessor)),
            asyncio.create_task(self._maintainer()),
            asyncio.create_task(self._surveyor()),
            asyncio.create_task(self._reuniter()),
            asyncio.create_task(self._stall_watch()),
            asyncio.create_task(self._clock_watch()),
        ]
        log.info(
            "%s: %s with %d virtual nodes",
            ring.info,
            f"joined through {self.bootstrap}" if self.bootstrap else "created a ring",
            len(ring.vnodes),
        )
        return self

    def _install(self, address: str, ids: list[int]) -> Ring:
        """Make the routing state and the key-value service for ``ids`` and serve their RPCs."""
        ring = Ring(
            address,
            ids,
            self._call,
            space=self.space,
            successors=self.config.successors,
            timeout=self.config.rpc_timeout,
            settings=self.ring_settings(),
            detector=self.detector,
            on_event=self._on_ring_event,
            weight=self.config.weight,
            route_ttl=max(2.0, 4 * self.config.stabilize_interval),
        )
        for vnode in ring.vnodes:
            vnode.on_predecessor_change(self._on_predecessor_change)
        self._ring = ring
        self._kv = KVService(
            ring,
            self.storage,
            self.strategy,
            self._call,
            self.config,
            self._emit,
            members=lambda: self._members,
            trusted=self._trusted,
            wall=self.wall,
        )
        self.fence.name = ring.info
        self._handlers.update(ring.handlers())
        self._handlers.update(self._kv.handlers())
        for method in CLOCKED & set(ring.handlers()):  # their answers tell the caller this node's time
            self._handlers[method] = self._clocked(self._handlers[method])
        self._handlers["chord.join"] = self._refuse_join
        return ring

    def _derived_ids(self, address: str) -> list[int]:
        """This process's ids derived from its address alone (a ring's first process, or fixed ids)."""
        count = vnode_count(self.config.vnodes, self.config.weight)
        ids = derived_ids(address, count, self.space)
        if self.config.node_id is not None:
            ids = [self.config.node_id, *(i for i in ids if i != self.config.node_id)][:count]
        return ids  # the first (the address's hash, or node_id) names the process

    async def _placed_ids(self, seed: str, address: str) -> list[int]:
        """Ids that even the ring out, placed by ``seed`` (``ring.place``; see :mod:`balancer.vnodes`).

        Fixed ids (``node_id``) are not placed. Raises the seed's own error if it does not answer.
        """
        derived = self._derived_ids(address)
        if self.config.node_id is not None:
            return derived
        request = {"address": address, "weight": self.config.weight, "count": len(derived)}
        try:
            raw = await self._call(seed, "ring.place", request, self.config.rpc_timeout * 8)
        except UnknownMethodError:
            raise IncompatibleConfigError(
                f"{seed} speaks an older protocol than {PROTOCOL_VERSION}"
            ) from None
        return sorted(set(wire.decode(wire.Placed, raw, self._limits).ids))

    async def _rpc_place(self, payload: Payload) -> Payload:
        """Place a joiner's ids: survey the ring, count the ids placed for other joiners lately as if
        they had joined already (so that processes joining at once through this seed do not all take
        from the same arcs), and allocate (:func:`balancer.vnodes.allocate_ids`)."""
        message = wire.decode(wire.Place, payload, self._limits)
        if not self.member or self._ring is None:
            raise RingError("this node is not a ring member yet")
        async with self._placing:
            found, _ = await survey(self._describe, [self._ring.address])
            ring = {i: d.address for d in found.values() if not d.leaving for i, _ in d.vnodes}
            weights = {d.address: d.weight for d in found.values()}
            now = time.monotonic()
            self._pending = {
                a: placed for a, placed in self._pending.items() if placed[2] > now and a not in found
            }
            for pending, (ids, weight, _) in self._pending.items():
                if pending != message.address:
                    ring.update(dict.fromkeys(ids, pending))
                    weights[pending] = weight
            address, count = message.address, message.count
            derived = derived_ids(address, count, self.space)
            ids = allocate_ids(ring, weights, message.weight, count, self.space, derived, address)
            spare = (i for i in derived if i not in ring and i not in ids)
            ids = sorted({*ids, *itertools.islice(spare, count - len(ids))})
            self._pending[address] = (ids, message.weight, now + max(60.0, self.config.join_timeout))
            while len(self._pending) > 64:  # a bound on what joiners can make this node remember
                del self._pending[next(iter(self._pending))]
        return {"ids": ids}

    async def _refuse_join(self, payload: Payload) -> Payload:
        raise RingError(f"{self.address} is not a ring member yet")

    async def _join_or_create(
        self, own: str, on_wait: Callable[[list[str], int, int], None] | None = None
    ) -> None:
        if own in self.seeds:
            raise ConfigError(f"seed {own} is this node's own address; give another member of the ring")
        loop = asyncio.get_running_loop()
        started = loop.time()
        # A node that may create the ring makes one pass: waiting would only delay the ring it founds.
        schedule = [0.0] if self.create_if_alone else self._join_schedule(self.config.join_timeout)
        waiting = list(self.seeds)  # seeds not heard from yet; one that answered as a stranger drops out
        problems: dict[str, BalancerError] = {}
        attempt = 0
        while waiting and attempt < len(schedule):
            await asyncio.sleep(max(0.0, started + schedule[attempt] - loop.time()))
            attempt += 1
            for seed in list(waiting):
                try:
                    await self._check_clock(seed)
                    await self._install(own, await self._placed_ids(seed, own)).join(seed)
                except StaleRequestError as exc:  # our clock is behind a seed that just started: ask again
                    problems[seed] = exc
                    continue
                except (IncompatibleConfigError, UnauthorizedError):  # a refusal: asking again will not help
                    raise
                except ClockFencedError as exc:  # measured through this seed: another may see otherwise
                    problems[seed] = exc
                    waiting.remove(seed)
                    continue
                except BadAnswerError as exc:  # up, and not a balancer node
                    if len(self.seeds) > 1 or self.create_if_alone:  # else the final error says it
                        log.warning("%s: seed %s is not a balancer node: %s", own, seed, exc)
                    problems[seed] = exc
                    waiting.remove(seed)
                    continue
                except (PeerUnreachableError, UnknownMethodError, RingError, RemoteError) as exc:
                    log.debug("%s: seed %s: %s", own, seed, exc)  # down, starting, or not a member yet
                    problems[seed] = exc
                    continue
                self.bootstrap = seed
                return
            if waiting and attempt < len(schedule) and loop.time() < started + self.config.join_timeout:
                if on_wait is not None:
                    on_wait(list(waiting), attempt, len(schedule))
                else:
                    log.info("%s: waiting for %s (%d/%d)", own, ", ".join(waiting), attempt, len(schedule))
            else:
                break
        refused = [e for e in problems.values() if isinstance(e, ClockFencedError)]
        if refused:  # never found a ring of its own with a clock its ring's seeds measured far off
            raise refused[0]
        if problems and not self.create_if_alone:
            raise self._join_failure(problems, attempt, loop.time() - started)
        self._install(own, self._derived_ids(own)).create()
        self.kv.mark_settled()  # a new ring: no other node can hold writes this one lacks

    async def _check_clock(self, seed: str) -> None:
        """Raise :class:`ClockFencedError` if this node's clock is beyond the fence's bound from the
        ring's: its offset to ``seed`` (from the round trip of a ``ring.describe``) plus the seed's own
        offset to its ring. A seed that is not a ring member yet raises :class:`RingError` (ask again)."""
        seed_view = await self._describe(seed)
        measured = self.clocks.offset(seed)
        if measured is None or seed_view.fenced:
            # a seed that does not tell its time (an older version), or one whose own clock disagrees
            # with its ring (in a ring of two, the midpoint of both): judged once a member, by everyone
            return
        ahead = seed_view.ahead - measured.seconds
        error = seed_view.ahead_error + measured.error
        skew = Skew(ahead, error, 1, int(abs(ahead) - error > self.clocks.bound), self.clocks.bound)
        if skew.fenced:
            raise fenced_error(skew, joining=seed)

    @staticmethod
    def _join_schedule(timeout: float) -> list[float]:
        """When each join pass starts, in seconds from the first: backoff from 0.25 s to 2 s, in timeout."""
        starts, delay = [0.0], 0.25
        while starts[-1] + delay <= timeout:
            starts.append(starts[-1] + delay)
            delay = min(2 * delay, 2.0)
        return starts

    @staticmethod
    def _join_failure(problems: dict[str, BalancerError], attempts: int, seconds: float) -> BalancerError:
        """The error of a join no seed accepted: the one seed's own, or a summary naming each seed."""
        after = f" (after {attempts} attempts in {seconds:.0f} s)" if attempts > 1 else ""
        if len(problems) == 1:
            seed, exc = next(iter(problems.items()))
            if isinstance(exc, PeerUnreachableError):
                return PeerUnreachableError(exc.address, str(exc).removeprefix(f"{exc.address}: ") + after)
            return RingError(f"cannot join through {seed}{after}: {exc}")
        return RingError(f"no seed answered{after}: {'; '.join(f'{s}: {e}' for s, e in problems.items())}")

    async def leave(self) -> None:
        """Leave the ring gracefully: hand every record to the successor, tell the neighbours, stop.

        If no successor accepts the records (the node is alone, or every successor is down), they stay
        in this node's storage and the node still stops.
        """
        if self.stopped or self._ring is None or self._kv is None:
            await self.close()
            return
        ring, kv = self._ring, self._kv
        # Take no more writes (coordinators send them to the next replicas instead), and let those being
        # applied finish: the hand-off below then carries every write this node acknowledged.
        await kv.quiesce()
        await self._stop_tasks()
        await kv.drain()
        heirs = ring.successors[: self.config.replicas]
        if heirs:
            try:
                await kv.hand_off_all(heirs)
            except BalancerError as exc:
                log.warning("%s: hand-off on leaving failed: %s", ring.info, exc)
        await ring.leave()
        await self.close()

    async def close(self) -> None:
        """Stop serving and release everything without telling the ring (it will notice and heal)."""
        if self.stopped:
            return
        self.stopped = True
        await self._stop_tasks()
        if self._kv is not None:
            self._kv.cancel_background()
        await self.transport.aclose()
        if self._ring is not None:  # after the transport: a peer asking meanwhile must not hear "left"
            self._ring.left = True
            for vnode in self._ring.vnodes:
                vnode.left = True
        await self.storage.close()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None or exc_type is asyncio.CancelledError:
            await self.leave()
        else:
            await self.close()

    # -- the public API ---------------------------------------------------------------------------

    @property
    def ring(self) -> Ring:
        """The routing state of this process's vnodes (raises :class:`RingError` before :meth:`start`)."""
        if self._ring is None:
            raise RingError("the node has not started")
        return self._ring

    @property
    def chord(self) -> Chord:
        """The routing state of this process's first vnode (see :attr:`ring` for all of them)."""
        return self.ring.first

    @property
    def kv(self) -> KVService:
        """The key-value service (raises :class:`RingError` before :meth:`start`)."""
        if self._kv is None:
            raise RingError("the node has not started")
        return self._kv

    @property
    def info(self) -> NodeInfo:
        """This process's first vnode: its id and the advertised address."""
        return self.ring.info

    @property
    def address(self) -> str:
        """The ``host:port`` other nodes and clients reach this node at."""
        return self.ring.address

    def view(self) -> RingView:
        """The first vnode's current view of the ring."""
        return self.chord.view()

    async def lookup(self, key: str | bytes) -> Lookup:
        """The vnode (id and process address) that owns ``key`` now, and the processes after it; the
        hop count is the network messages the lookup took."""
        return await self.ring.find_successor(self.space.id(self.kv.encode_key(key)))

    def _minority(self) -> tuple[int, int] | None:
        """``(up, members)`` if this node sees no majority of the ring's processes, else ``None``. The
        processes it declared failed within ``partition_memory`` seconds (or could not survey since one
        fell silent) and has not found in its ring since count as members it cannot see, except those
        whose connections were refused (a host that answers with no process listening: a dead node,
        not one on the other side of a partition)."""
        detector = self.detector
        now, memory, dead = time.monotonic(), self.config.partition_memory, detector.refusing
        unseen = {a for a, since in self._lost.items() if now - since < memory and a not in dead}
        # Peers silent for two timeouts count too: a node on the minority side of a partition stops
        # serving within that, well before the majority declares it failed (at least nine timeouts)
        # and takes its keys over, so the two sides never acknowledge writes of one key at once.
        patience = 2 * self.config.rpc_timeout
        known = {m.address for m in self._members}
        unseen.update(
            a for a in detector.silent if a in known and a not in dead and detector.silent_for(a) >= patience
        )
        if not unseen:
            return None
        members = {m.address for m in self._members if m.state != "down"} | unseen
        up = len(members) - len(unseen)
        return (up, len(members)) if 2 * up <= len(members) else None

    def _trusted(self) -> bool:
        """Whether this node's view of the ring may be trusted: it sees a majority of the ring, and is
        not merging rings (see :meth:`_check_majority`)."""
        if self._rejoining:
            return False
        return not (self._lost or self.detector.silent) or self._minority() is None

    def _check_majority(self) -> None:
        """Raise :class:`CutOffError` if this node sees no majority of the ring (:meth:`_minority`), or
        if it merged two rings (or came back from a minority) and has not synced since: until its
        maintenance pass has synced it with the whole merged ring, its view may be half of each side's.
        Raise :class:`ClockFencedError` if its clock is fenced (:attr:`fence`). Costs four truth tests
        when nothing is lost, silent, merging or fenced (every client operation)."""
        if not (self._lost or self._rejoining or self.detector.silent or self.fence.fenced):
            return
        if self.fence.fenced is not None:
            raise self.fence.error()
        cut = self._minority()
        if cut is not None:
            raise CutOffError(*cut)
        if self._rejoining:
            raise CutOffError(len(self._members), len(self._members), rejoining=True)

    async def get(self, key: str | bytes) -> bytes:
        """The value of ``key`` from the ring; raises :class:`~balancer.errors.KeyNotFoundError`, and
        :class:`~balancer.errors.CutOffError` if this node sees no majority of the ring."""
        if not self._observing:  # the common case: no plugin listens, so no timing
            self._check_majority()
            return await self.kv.get(key)
        with self._observed("get", key):
            self._check_majority()
            return await self.kv.get(key)

    async def put(self, key: str | bytes, value: bytes) -> None:
        """Store ``value`` under ``key`` on the ring."""
        if not self._observing:
            self._check_majority()
            await self.kv.put(key, value)
            return
        with self._observed("put", key):
            self._check_majority()
            await self.kv.put(key, value)

    async def delete(self, key: str | bytes) -> None:
        """Delete ``key`` from the ring; raises :class:`~balancer.errors.KeyNotFoundError` if absent."""
        with self._observed("delete", key):
            self._check_majority()
            await self.kv.delete(key)

    def ring_settings(self) -> dict[str, int | str]:
        """The settings every member of this node's ring must share (:meth:`Config.ring_settings`), with
        the replication strategy's own (:meth:`ReplicationStrategy.settings`, as ``<name>.<setting>``)."""
        own = {f"{self.config.replication}.{k}": v for k, v in self.strategy.settings().items()}
        return {**self.config.ring_settings(), **own}

    def members(self) -> tuple[Member, ...]:
        """The processes of the ring as this node knows them now, sorted by address (itself included).

        Kept current by a survey of the ring after every change this node sees (and every
        ``survey_interval`` seconds); a peer declared failed shows as down at once. The
        ``balancer_membership_changed`` event reports every change, so nobody needs to poll.
        """
        return self._members

    async def ring_status(self) -> RingStatus:
        """Survey the ring now (one message per process): every member with its state, vnodes, weight,
        records and share of the key space, and whether the ring has settled. Updates :meth:`members`."""
        ring = self.ring
        start = [ring.address, *(m.address for m in self._members if m.address != ring.address)]
        epoch = ring.epoch
        found, failed = await survey(self._describe, start)
        back = {a for a, d in found.items() if not d.leaving}
        self._departed -= back  # back after leaving
        for address in back:  # back after failing: the next failure is news again
            if self._heard.get(address) in ("left", "failed"):
                del self._heard[address]
        failed = {a: e for a, e in failed.items() if a not in self._departed}
        remembered = [m for m in self._members if m.address not in self._departed and m.state != "leaving"]
        status = status_of(
            found,
            failed,
            self.space,
            self.config.successors,
            detector=self.detector,
            remembered=remembered,
            pointed=ring.pointed(),
        )
        self._set_members(status.members)
        now = time.monotonic()
        for member in status.members:
            exc = failed.get(member.address)
            if member.state == "down" and not (isinstance(exc, PeerUnreachableError) and exc.refused):
                # silent and gone from this node's routing (perhaps by hearsay from a peer that declared
                # it failed): as lost as one this node declared failed itself
                self._lost.setdefault(member.address, now)
        if status.settled and not failed:  # a small settled ring: lookups answer from the whole map
            ring.adopt_map({i: d.address for d in found.values() for i, _ in d.vnodes}, epoch)
        return status

    def _set_members(self, members: tuple[Member, ...]) -> None:
        if members != self._members:
            self._members = members
            self._emit("membership_changed", node=self.ring.info, members=members)

    def _mark(self, address: str, state: str | None) -> None:
        """Show the change a ring event reported at once (``None``: gone), before the next survey."""
        members = {m.address: m for m in self._members}
        if state is None:
            members.pop(address, None)
        elif address in members:
            members[address] = dataclasses.replace(
                members[address], state=state, share=0.0 if state == "down" else members[address].share
            )
        else:
            members[address] = Member(address, state=state)
        self._set_members(tuple(members[a] for a in sorted(members)))

    async def _describe(self, address: str) -> wire.Described:
        if self._ring is not None and address == self._ring.address:
            payload = await self._rpc_describe({})
        else:
            payload = await self._call(address, "ring.describe", {}, self.config.rpc_timeout)
        return wire.decode(wire.Described, payload, self._limits)

    async def _rpc_describe(self, payload: Payload) -> Payload:
        if not self.member or self._ring is None or self._kv is None:
            raise RingError(f"{self.address if self._ring else 'this node'} is not a ring member yet")
        ring = self._ring
        return {
            "address": ring.address,
            "vnodes": [[v.info.id, [s.id for s in v.successors]] for v in ring.vnodes],
            "neighbours": sorted(ring.pointed()),
            "weight": self.config.weight,
            "leaving": self._kv.leaving or ring.left,
            "records": await self.storage.count(),
            "ahead": self.fence.skew.ahead,
            "ahead_error": self.fence.skew.error,
            "fenced": self.fence.fenced is not None,
        }

    def routes(self) -> list[Route]:
        """The HTTP endpoints plugins added to this node."""
        return list(self._routes)

    async def local_records(self) -> list[Record]:
        """The records this node stores itself (tombstones included), in no particular order."""
        records: list[Record] = []
        async for batch in self.storage.scan():
            records.extend(batch)
        return records

    async def ring_view(self) -> Payload:
        """:meth:`ring_status` as JSON-safe data (``GET /ring``).

        A survey costs every process of the ring a message, so clients share them: a request while one
        is under way waits for it, and one within :data:`VIEW_REUSE` seconds of the last gets its
        result. However fast ``/ring`` is polled, the ring answers at most a few surveys a second.
        """
        loop = asyncio.get_running_loop()
        if self._view_survey is None:
            last = self._last_view
            if last is not None and loop.time() - last[0] < VIEW_REUSE:
                return last[1]
            self._view_survey = asyncio.ensure_future(self._survey_view())
        return await asyncio.shield(self._view_survey)

    async def _survey_view(self) -> Payload:
        try:
            view = (await self.ring_status()).to_json(self.space.bits)
            self._last_view = (asyncio.get_running_loop().time(), view)
            return view
        finally:
            self._view_survey = None

    async def lookup_view(self, key: str) -> Payload:
        """Where ``key`` lives, as JSON-safe data (``GET /lookup/<key>``): its ring id, its owner (a vnode),
        the lookup's hops and ``path`` (this node, then each process that answered), and its replica set
        and stand-ins as this node places it now."""
        data = self.kv.encode_key(key)
        found = await self.lookup(data)
        replicas, standins = await self.kv.replica_set(data)
        bits = self.space.bits
        return {
            "key": key,
            "id": format_id(self.space.id(data), bits),
            "owner": {"address": found.owner.address, "id": format_id(found.owner.id, bits)},
            "hops": found.hops,
            "path": [self.address, *found.path],
            "replicas": [n.address for n in replicas],
            "standins": [n.address for n in standins],
        }

    async def status(self) -> Payload:
        """The node's view of the ring and its record count, as JSON-safe data (``GET /status``)."""
        view = self.view()
        return {
            "id": format_id(view.node.id, self.space.bits),
            "address": view.node.address,
            "predecessor": view.predecessor.address if view.predecessor else None,
            "successors": [s.address for s in view.successors],
            "fingers": [{"id": format_id(f.id, self.space.bits), "address": f.address} for f in view.fingers],
            "records": await self.storage.count(),
            "vnodes": len(self.ring.vnodes),
            "weight": self.config.weight,
            "settings": self.ring_settings(),
            "settled": self.kv.settled,
            "clock": self.fence.skew.to_json(),
        }

    # -- internals --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _observed(self, operation: str, key: str | bytes) -> Iterator[None]:
        """Report the operation's duration and outcome to the ``balancer_kv_operation`` hook."""
        if not self._observing:
            yield
            return
        started, outcome = time.perf_counter(), "error"
        try:
            yield
            outcome = "ok"
        except BalancerError as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self._emit(
                "kv_operation",
                node=self.chord.info,
                operation=operation,
                seconds=time.perf_counter() - started,
                ok=outcome == "ok",
                outcome=outcome,
                key_id=self.space.id(key.encode() if isinstance(key, str) else key),
            )

    async def _rpc_status(self, payload: Payload) -> Payload:
        return await self.status()

    def _emit(self, event: str, **kwargs: Any) -> None:
        try:
            self.registry.emit(event, **kwargs)
        except Exception:  # a misbehaving plugin must not break the ring
            log.exception("%s: an event hook for %r failed", self._ring and self._ring.info, event)

    def _on_ring_event(self, event: str, peer: NodeInfo) -> None:
        """A vnode saw ``peer`` (a vnode of another process) join, leave or fail. The ``node_*`` hooks
        hear of it once per process and change: a process that joined is reported once, until it is
        reported to have left or failed; :meth:`members` shows the change at once."""
        self._membership_changed.set()
        self._survey_due.set()
        address = peer.address
        if self._kv is not None:
            if event == "joined":
                self._kv.peer_back(address)
            else:
                self._kv.forget_peer(address, left=event == "left")
        if not self.member:
            return
        last = self._heard.get(address)
        if event == "failed":
            self._lost.setdefault(address, time.monotonic())
            self._mark(address, "down")
            if last in ("left", "failed"):
                return
        elif event == "left":
            self._lost.pop(address, None)
            self.clocks.forget(address)
            self._departed.add(address)
            self._mark(address, None)
            if last == "left":
                return
        else:
            if address not in self._departed and all(m.address != address for m in self._members):
                self._mark(address, "up")  # the next survey tells the rest
            if last == "joined" or address in self._departed:
                return
        self._heard[address] = event
        self._emit(f"node_{event}", node=self.ring.info, peer=peer)

    def _on_predecessor_change(self, old: NodeInfo | None, new: NodeInfo | None) -> None:
        self._membership_changed.set()
        self._survey_due.set()

    async def _every(
        self,
        period: float,
        step: Callable[[], Awaitable[Any]],
        first: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Run ``step`` every ``period`` seconds (jittered); ``first`` instead of it the first time."""
        jitter = self.config.jitter
        while True:
            await asyncio.sleep(period * self._random.uniform(1 - jitter, 1 + jitter))
            try:
                await (first or step)()
                first = None
            except PeerUnreachableError as exc:
                log.debug("%s: %s: %s", self.chord.info, getattr(step, "__name__", step), exc)
            except BalancerError as exc:
                log.info("%s: %s failed: %s", self.chord.info, getattr(step, "__name__", step), exc)
            except Exception:
                log.exception("%s: %s crashed; it will run again", self.chord.info, step)

    async def _maintainer(self) -> None:
        """Run the replica maintenance pass periodically, and soon after any membership change."""
        jitter = self.config.jitter
        while True:
            period = self.config.anti_entropy_interval * self._random.uniform(1 - jitter, 1 + jitter)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation and hang close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._membership_changed.wait()
                # let stabilization settle the new neighbours before computing replica sets
                await asyncio.sleep(self.config.stabilize_interval)
            self._membership_changed.clear()
            try:
                await self.kv.maintain()
                if self._rejoining and self.kv.synced:  # a pass synced it with the whole merged ring
                    self._rejoining = False
            except Exception:
                log.exception("%s: the maintenance pass failed; it will run again", self.chord.info)

    async def _surveyor(self) -> None:
        """Survey the ring soon after any change this node sees, and every ``survey_interval``; a ring of
        at most r processes that has not settled yet is surveyed again soon (it is cheap, and a settled
        small ring answers every lookup locally: see :meth:`Ring.adopt_map`)."""
        jitter = self.config.jitter
        while True:
            period = self.config.survey_interval * self._random.uniform(1 - jitter, 1 + jitter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._survey_due.wait()
                await asyncio.sleep(2 * self.config.stabilize_interval)  # one change often brings more
            self._survey_due.clear()
            try:
                status = await self.ring_status()
                if not status.settled and len(status.members) <= self.config.successors:
                    self._survey_due.set()  # a small ring settles in a few rounds: look again soon
            except BalancerError as exc:
                log.info("%s: surveying the ring failed: %s", self.ring.info, exc)
            except Exception:
                log.exception("%s: surveying the ring crashed; it will run again", self.ring.info)

    async def _stall_watch(self) -> None:
        """Notice when this process stops running for longer than an RPC timeout (SIGSTOP, a long GC
        pause, a blocked event loop) and tell the failure detector: the calls that timed out meanwhile
        say nothing of the peers, so their silence counts from the moment this process runs again.
        Without it, a node back from a pause sees every peer silent, declares them failed and answers
        503 as if cut off. Its timer is the earliest to fire after a pause, before those timeouts.

        A stall long enough that the peers may have declared this node failed (they need at least nine
        RPC timeouts of silence; :data:`REJOIN_AFTER` of them is the margin) means the ring may have
        moved on without it: it serves no client operation until a maintenance pass has synced it with
        the ring again, as after a partition."""
        tick = STALL_TICK
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            late = time.monotonic() - before - tick
            if late > self.config.rpc_timeout:
                self.detector.resumed_at = time.monotonic()
                rejoin = late > REJOIN_AFTER * self.config.rpc_timeout
                if rejoin:
                    self._rejoining = True
                    self.kv.unsettle()
                    self._membership_changed.set()  # a maintenance pass soon
                log.warning(
                    "%s: this process did not run for %.1f s (paused, or its loop blocked)%s",
                    self.ring.info,
                    late,
                    "; it serves again once it has synced with the ring" if rejoin else "",
                )

    def _clocked(self, handler: Handler) -> Handler:
        """``handler`` whose answers carry this node's wall clock (``clock``: see :mod:`balancer.skew`)."""
        wall = self.wall

        async def clocked(payload: Payload) -> Payload:
            return {**await handler(payload), "clock": wall()}

        clocked.__name__ = getattr(handler, "__name__", "handler")
        return clocked

    async def _clock_watch(self) -> None:
        """Measure this node's clock against its live peers' every stabilization round, and fence it
        while it disagrees with a majority of them (see :mod:`balancer.skew`)."""
        jitter = self.config.jitter
        while True:
            await asyncio.sleep(self.config.stabilize_interval * self._random.uniform(1 - jitter, 1 + jitter))
            self.fence.update(m.address for m in self._members if m.live and m.address != self.address)

    def _fence_lifted(self) -> None:
        if self._kv is not None:
            self._kv.clock.rewind()

    async def _reuniter(self) -> None:
        """Every few stabilization rounds, try one process this node declared failed (round robin).
        One that answers is merged with (:meth:`Ring.reunite`): after a partition heals, each side is a
        ring of its own until then. One whose ring turns out to be this one is no longer lost; so right
        after a merge, the others are tried at once. Entries older than ``partition_memory`` expire."""
        jitter = self.config.jitter
        period = max(1.0, 4 * self.config.stabilize_interval)
        turn = 0
        while True:
            await asyncio.sleep(period * self._random.uniform(1 - jitter, 1 + jitter))
            now = time.monotonic()
            for address in [a for a, t in self._lost.items() if now - t >= self.config.partition_memory]:
                del self._lost[address]
            if not self._lost:
                continue
            turn += 1
            lost = sorted(self._lost)
            if await self._reunite(lost[turn % len(lost)]):
                for address in lost:
                    if address in self._lost:
                        await self._reunite(address)

    async def _reunite(self, address: str) -> bool:
        """Try to merge with the ring of ``address``; whether it answered and a merge changed anything."""
        minority = self._minority() is not None
        try:
            merged = await self.ring.reunite(address)
        except PeerUnreachableError:
            return False
        except BalancerError as exc:
            log.info("%s: could not merge with %s: %s", self.ring.info, address, exc)
            return False
        except Exception:
            log.exception("%s: merging with %s crashed; it will be tried again", self.ring.info, address)
            return False
        if not merged:
            self._lost.pop(address, None)  # its ring is this one: found again
        if merged or (minority and self._minority() is None):
            # Merged two rings, or back from a minority (the other side merged this ring into theirs):
            # until a maintenance pass has synced it with the whole ring, this node's view may be half
            # of each side's, and what it holds the minority's. It serves again after that pass. Set
            # before anything else awaits, so that no client operation runs on the half-merged view.
            self._rejoining = True
            self.kv.unsettle()
        if merged:
            self._membership_changed.set()
            self._survey_due.set()
            with contextlib.suppress(BalancerError):
                await self.ring.settle()
        return merged

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _outcome(exc: BalancerError) -> str:
    """The ``balancer_kv_operation`` outcome of an operation that raised ``exc``."""
    if isinstance(exc, KeyNotFoundError):
        return "not_found"
    if isinstance(exc, CutOffError | GoneError | ClockFencedError):
        return "refused"
    if isinstance(exc, QuorumError):
        return "quorum"
    if isinstance(exc, BadRequestError | TooLargeError):
        return "invalid"
    return "error"
