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
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import pluggy

from balancer.chord import Chord
from balancer.config import Config
from balancer.errors import (
    BadAnswerError,
    BalancerError,
    ConfigError,
    IncompatibleConfigError,
    PeerUnreachableError,
    RemoteError,
    RingError,
    StaleRequestError,
    UnauthorizedError,
    UnknownMethodError,
)
from balancer.failure import FailureDetector
from balancer.hookspecs import Handler, Payload, PublicApi, Route, Storage, Transport
from balancer.keyspace import KeySpace
from balancer.kv import KVService
from balancer.plugin import Registry, plugin_manager
from balancer.types import Lookup, Member, NodeInfo, Record, RingView, format_id

__all__ = ["Node"]

log = logging.getLogger(__name__)


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
        self._chord: Chord | None = None
        self.detector = FailureDetector(self.config.rpc_timeout, self.config.phi_threshold)
        """Round-trip times and suspicion of every peer this node calls (see :mod:`balancer.failure`)."""
        self._kv: KVService | None = None
        self._members: tuple[Member, ...] = ()
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
        ident = self.config.node_id if self.config.node_id is not None else self.space.id(address)
        info = NodeInfo(ident, address)
        call = self.detector.monitor(self.transport.call)
        self._chord = chord = Chord(
            info,
            call,
            space=self.space,
            successors=self.config.successors,
            timeout=self.config.rpc_timeout,
            settings=self.config.ring_settings(),
            on_event=self._on_ring_event,
            detector=self.detector,
        )
        self._kv = KVService(chord, self.storage, self.strategy, call, self.config, self._emit)
        chord.on_predecessor_change(self._on_predecessor_change)
        self._handlers.update(chord.handlers())
        self._handlers.update(self._kv.handlers())
        self._handlers["node.status"] = self._rpc_status
        # Until this node is a ring member, a joiner asking it must wait, not take it for a ring of one.
        self._handlers["chord.join"] = self._refuse_join
        try:
            await self._join_or_create(chord, on_join_wait)
        except BaseException:
            await self.close()
            raise
        self._handlers["chord.join"] = chord.handlers()["chord.join"]
        self._refresh_members()
        self._tasks = [
            asyncio.create_task(self._every(self.config.stabilize_interval, chord.stabilize)),
            asyncio.create_task(self._every(self.config.fix_fingers_interval, chord.fix_fingers)),
            asyncio.create_task(self._every(self.config.check_predecessor_interval, chord.check_predecessor)),
            asyncio.create_task(self._maintainer()),
        ]
        log.info("%s: %s", info, f"joined through {self.bootstrap}" if self.bootstrap else "created a ring")
        return self

    async def _refuse_join(self, payload: Payload) -> Payload:
        raise RingError(f"{self.address} is not a ring member yet")

    async def _join_or_create(
        self, chord: Chord, on_wait: Callable[[list[str], int, int], None] | None = None
    ) -> None:
        own = chord.info.address
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
                    await chord.join(seed)
                except StaleRequestError as exc:  # our clock is behind a seed that just started: ask again
                    problems[seed] = exc
                    continue
                except (IncompatibleConfigError, UnauthorizedError):  # a refusal: asking again will not help
                    raise
                except BadAnswerError as exc:  # up, and not a balancer node
                    if len(self.seeds) > 1 or self.create_if_alone:  # else the final error says it
                        log.warning("%s: seed %s is not a balancer node: %s", chord.info, seed, exc)
                    problems[seed] = exc
                    waiting.remove(seed)
                    continue
                except (PeerUnreachableError, UnknownMethodError, RingError, RemoteError) as exc:
                    log.debug("%s: seed %s: %s", chord.info, seed, exc)  # down, starting, or not a member yet
                    problems[seed] = exc
                    continue
                self.bootstrap = seed
                return
            if waiting and attempt < len(schedule) and loop.time() < started + self.config.join_timeout:
                if on_wait is not None:
                    on_wait(list(waiting), attempt, len(schedule))
                else:
                    log.info(
                        "%s: waiting for %s (%d/%d)", chord.info, ", ".join(waiting), attempt, len(schedule)
                    )
            else:
                break
        if problems and not self.create_if_alone:
            raise self._join_failure(problems, attempt, loop.time() - started)
        chord.create()

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
        if self.stopped or self._chord is None or self._kv is None:
            await self.close()
            return
        chord, kv = self._chord, self._kv
        # Take no more writes (coordinators send them to the next replicas instead), and let those being
        # applied finish: the hand-off below then carries every write this node acknowledged.
        await kv.quiesce()
        await self._stop_tasks()
        await kv.drain()
        heirs = [s for s in chord.successors if s != chord.info][: self.config.replicas]
        if heirs:
            try:
                await kv.hand_off_all(heirs)
            except BalancerError as exc:
                log.warning("%s: hand-off on leaving failed: %s", chord.info, exc)
        await chord.leave()
        await self.close()

    async def close(self) -> None:
        """Stop serving and release everything without telling the ring (it will notice and heal)."""
        if self.stopped:
            return
        self.stopped = True
        await self._stop_tasks()
        if self._kv is not None:
            self._kv.cancel_background()
        if self._chord is not None:
            self._chord.left = True
        await self.transport.aclose()
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
    def chord(self) -> Chord:
        """The routing state (raises :class:`RingError` before :meth:`start`)."""
        if self._chord is None:
            raise RingError("the node has not started")
        return self._chord

    @property
    def kv(self) -> KVService:
        """The key-value service (raises :class:`RingError` before :meth:`start`)."""
        if self._kv is None:
            raise RingError("the node has not started")
        return self._kv

    @property
    def info(self) -> NodeInfo:
        """This node's id and advertised address."""
        return self.chord.info

    @property
    def address(self) -> str:
        """The ``host:port`` other nodes and clients reach this node at."""
        return self.chord.info.address

    def view(self) -> RingView:
        """This node's current view of the ring."""
        return self.chord.view()

    async def lookup(self, key: str | bytes) -> Lookup:
        """The node that owns ``key`` now, with the number of hops the lookup took."""
        return await self.chord.find_successor(self.space.id(self.kv.encode_key(key)))

    async def get(self, key: str | bytes) -> bytes:
        """The value of ``key`` from the ring; raises :class:`~balancer.errors.KeyNotFoundError`."""
        with self._observed("get"):
            return await self.kv.get(key)

    async def put(self, key: str | bytes, value: bytes) -> None:
        """Store ``value`` under ``key`` on the ring."""
        with self._observed("put"):
            await self.kv.put(key, value)

    async def delete(self, key: str | bytes) -> None:
        """Delete ``key`` from the ring; raises :class:`~balancer.errors.KeyNotFoundError` if absent."""
        with self._observed("delete"):
            await self.kv.delete(key)

    def members(self) -> tuple[Member, ...]:
        """The processes of the ring as this node knows them now, sorted by address (itself included).

        The ``balancer_membership_changed`` event reports every change of this view, so applications
        can follow it without polling.
        """
        return self._members

    def _refresh_members(self) -> None:
        """Recompute :meth:`members` from the routing state; emit the event if it changed."""
        if self._chord is None:
            return
        chord = self._chord
        known = [chord.info, *chord.successors, *(f for f in chord.fingers if f is not None)]
        if chord.predecessor is not None:
            known.append(chord.predecessor)
        ids: dict[str, set[int]] = {}
        for node in known:
            ids.setdefault(node.address, set()).add(node.id)
        members = tuple(
            Member(
                address,
                tuple(sorted(ids[address])),
                state="suspect" if self.detector.suspect(address) else "up",
            )
            for address in sorted(ids)
        )
        if members != self._members:
            self._members = members
            self._emit("membership_changed", node=chord.info, members=members)

    def routes(self) -> list[Route]:
        """The HTTP endpoints plugins added to this node."""
        return list(self._routes)

    async def local_records(self) -> list[Record]:
        """The records this node stores itself (tombstones included), in no particular order."""
        records: list[Record] = []
        async for batch in self.storage.scan():
            records.extend(batch)
        return records

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
            "settings": self.config.ring_settings(),
        }

    # -- internals --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _observed(self, operation: str) -> Iterator[None]:
        """Report the operation's duration and outcome to the ``balancer_kv_operation`` hook."""
        if not self._observing:
            yield
            return
        started, ok = time.perf_counter(), False
        try:
            yield
            ok = True
        finally:
            seconds = time.perf_counter() - started
            self._emit("kv_operation", node=self.chord.info, operation=operation, seconds=seconds, ok=ok)

    async def _rpc_status(self, payload: Payload) -> Payload:
        return await self.status()

    def _emit(self, event: str, **kwargs: Any) -> None:
        try:
            self.registry.emit(event, **kwargs)
        except Exception:  # a misbehaving plugin must not break the ring
            log.exception("%s: an event hook for %r failed", self._chord and self._chord.info, event)

    def _on_ring_event(self, event: str, peer: NodeInfo) -> None:
        self._membership_changed.set()
        self._refresh_members()
        if event != "joined" and self._kv is not None:
            self._kv.forget_peer(peer.address)
        self._emit(f"node_{event}", node=self.chord.info, peer=peer)

    def _on_predecessor_change(self, old: NodeInfo | None, new: NodeInfo | None) -> None:
        self._membership_changed.set()
        self._refresh_members()

    async def _every(self, period: float, step: Callable[[], Awaitable[Any]]) -> None:
        jitter = self.config.jitter
        while True:
            await asyncio.sleep(period * self._random.uniform(1 - jitter, 1 + jitter))
            try:
                await step()
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
            except Exception:
                log.exception("%s: the maintenance pass failed; it will run again", self.chord.info)

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
