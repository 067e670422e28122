"""Fault harness: balancer nodes as real processes, each in its own Linux network namespace on one bridge,
faults injected on a schedule, a client that records every operation, and a checker over that history.

Each node runs in a namespace of its own with a veth pair on a bridge the harness creates (10.N.M.0/24,
the bridge itself at .1, where the client runs). Faults:

- partitions: nftables rules in the namespaces drop packets between chosen nodes (silently, as a cut
  cable does); the client keeps reaching every node, as clients on both sides of a real partition do;
- packet loss: a random share of the packets that arrive from other nodes is dropped;
- slow links: a token bucket (``tc tbf``) limits what a node sends, so its packets queue (this kernel has
  no ``netem``, so delay comes from queueing, not from a fixed added latency);
- pauses: SIGSTOP and SIGCONT; crashes: kill -9, and a restart on the same address (and data folder);
- clock skew: a node started with ``--clock-offset`` (a test-only option) runs its clocks that far off;
  one started with ``--clock-drift`` (test-only too) gains or loses that many seconds per second, so it
  drifts away from the ring's clock while it is a member (and is fenced once past the bound).

Everything the harness creates it removes, also when the run fails (namespaces, bridge, processes). It
needs root and iproute2 and nftables: :func:`unavailable` says what is missing.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from _harness import until

PORT = 9000
NODE_FLAGS = [
    "--stabilize-interval",
    "0.3",
    "--rpc-timeout",
    "0.5",
    "--anti-entropy-interval",
    "1",
    "--vnodes",
    "8",
    "--no-plugins",
    "--loop",
    "asyncio",
]


def unavailable() -> str | None:
    """Why the harness cannot run here, or ``None`` if it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, nftables)"
    probe = f"bcprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.decode().strip()}"
    try:
        table = _sh("ip", "netns", "exec", probe, "nft", "add", "table", "inet", "chaos", check=False)
        if table.returncode:
            return f"nftables does not work in a namespace: {table.stderr.decode().strip()}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return None


def _sh(*command: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(command, capture_output=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.decode().strip()}")
    return done


@dataclass
class Host:
    """One network namespace with its address, and the faults applied to it."""

    name: str
    ip: str
    client_ip: str
    blocked: set[str] = field(default_factory=set)
    loss: int = 0

    def run(self, *command: str) -> subprocess.CompletedProcess[bytes]:
        return _sh("ip", "netns", "exec", self.name, *command)

    def apply(self) -> None:
        """Rewrite this host's packet filter from ``blocked`` and ``loss``."""
        self.run("nft", "flush", "chain", "inet", "chaos", "input")
        for ip in sorted(self.blocked):
            self.run("nft", "add", "rule", "inet", "chaos", "input", "ip", "saddr", ip, "drop")
        if self.loss:
            share = ["numgen", "random", "mod", "100", "<", str(self.loss)]
            self.run("nft", "add", "rule", "inet", "chaos", "input", "ip", "saddr", "!=", self.client_ip,
                     *share, "drop")  # fmt: skip

    def shape(self, rate: str | None) -> None:
        """Limit what this host sends to ``rate`` (``tc`` syntax, e.g. ``512kbit``), or lift the limit."""
        if rate is None:
            _sh("ip", "netns", "exec", self.name, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        else:
            self.run("tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "16kbit",
                     "latency", "400ms")  # fmt: skip


class Network:
    """A bridge in the root namespace and a namespace per host on it; :meth:`close` removes them all."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.prefix = f"bc{tag}"
        self.subnet = f"10.{100 + tag % 100}.{tag // 100 % 250}"
        self.bridge = f"{self.prefix}br"
        self.client_ip = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.client_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")

    def add_host(self) -> Host:
        index = len(self.hosts) + 1
        name, veth = f"{self.prefix}n{index}", f"{self.prefix}v{index}"
        host = Host(name, f"{self.subnet}.{10 + index}", self.client_ip)
        _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        _sh("ip", "link", "set", veth, "master", self.bridge, "up")
        host.run("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "link", "set", "lo", "up")
        host.run("nft", "add", "table", "inet", "chaos")
        host.run("nft", "add", "chain", "inet", "chaos", "input", "{ type filter hook input priority 0; }")
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            _sh("ip", "netns", "del", host.name, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        self.hosts.clear()


@dataclass
class Member:
    """One node process in its host."""

    host: Host
    args: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    started: float = 0.0  # monotonic time of the last start
    retired: bool = False  # killed for good by its schedule: not restarted at the end

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{PORT}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, join: Member | None) -> None:
        where = ["--join", join.address] if join else ["--ring"]
        command = ["ip", "netns", "exec", self.host.name, sys.executable, "-m", "balancer", "-v", "node",
                   "--host", self.host.ip, "--port", str(PORT), *where, *NODE_FLAGS, *self.args]  # fmt: skip
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.paused = False
        self.started = time.monotonic()

    async def clock(self) -> dict[str, object] | None:
        """This member's ``clock`` in ``GET /status`` (see balancer.skew), or None if it does not answer."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                http.get(f"http://{self.address}/status") as resp,
            ):
                found = orjson.loads(await resp.read()).get("clock") if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.process is not None
            os.kill(self.process.pid, sig)

    def kill(self) -> None:
        """kill -9 (a stopped process dies too), and reap."""
        if self.alive:
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=20)
        self.paused = False

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    async def leave(self) -> int:
        """SIGTERM (a graceful leave), and the exit status."""
        self.resume()
        self.signal(signal.SIGTERM)
        process = self.process
        assert process is not None
        try:
            return await asyncio.to_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


class Cluster:
    """Members on a :class:`Network`, with the faults a schedule asks for."""

    def __init__(self, net: Network, folder: Path, args: list[str], data: bool) -> None:
        self.net = net
        self.folder = folder
        self.args = args
        self.data = data
        self.members: list[Member] = []
        self.notes: list[str] = []
        """What a schedule observed besides the history (when a clock was fenced, a join refused)."""

    def add(self, extra: Iterable[str] = ()) -> Member:
        host = self.net.add_host()
        args = [*self.args, *extra]
        if self.data:
            args += ["--data-dir", str(self.folder / host.name)]
            (self.folder / host.name).mkdir()
        member = Member(host, args, self.folder / f"{host.name}.log")
        self.members.append(member)
        return member

    def live(self) -> list[Member]:
        return [m for m in self.members if m.alive]

    def partition(self, *sides: Iterable[Member]) -> None:
        """Cut every link between members of different ``sides`` (a member in no side keeps its links)."""
        groups = [list(side) for side in sides]
        for i, group in enumerate(groups):
            others = {m.host.ip for j, other in enumerate(groups) if j != i for m in other}
            for member in group:
                member.host.blocked = set(others)
                member.host.apply()

    def bridge(self, left: list[Member], middle: Member, right: list[Member]) -> None:
        """``left`` and ``right`` cannot reach each other; ``middle`` reaches both."""
        self.partition(left, right)
        middle.host.blocked = set()
        middle.host.apply()

    def lose(self, percent: int) -> None:
        for member in self.members:
            member.host.loss = percent
            member.host.apply()

    def heal(self) -> None:
        """Lift every network fault and resume paused members."""
        for member in self.members:
            member.host.blocked, member.host.loss = set(), 0
            member.host.apply()
            member.host.shape(None)
            if member.paused:
                member.resume()

    def stop(self) -> None:
        for member in self.members:
            member.kill()


# -- the client and its history ------------------------------------------------------------------------


@dataclass
class Op:
    """One operation as the client saw it. ``status``: ``ok``, ``missing`` (404), ``fail`` (an error
    answer, the HTTP status in ``code``) or ``timeout`` (no answer: its outcome is unknown)."""

    kind: str  # read, put, delete
    key: str
    index: int  # a put's or delete's position in its key's writes (values are "key#index"); 0 for reads
    node: str
    start: float
    end: float = 0.0
    status: str = ""
    code: int = 0
    value: str | None = None


class Client:
    """Workers that each own some keys (one writer per key, writing in turn), read any key through any
    live member, and record every operation."""

    def __init__(self, cluster: Cluster, *, workers: int, keys_per_worker: int, seed: int) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.keys = [[f"w{w}k{k}" for k in range(keys_per_worker)] for w in range(workers)]
        self.history: list[Op] = []
        self.writes: dict[str, int] = {}
        self.timeout = aiohttp.ClientTimeout(total=4)
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self, seconds: float) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector, timeout=self.timeout) as http:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(self._worker(http, own, deadline) for own in self.keys))

    async def _worker(self, http: aiohttp.ClientSession, own: list[str], deadline: float) -> None:
        rng = random.Random(self.rng.random())
        everything = [k for keys in self.keys for k in keys]
        while time.monotonic() < deadline:
            targets = [m for m in self.cluster.members if m.alive] or self.cluster.members
            node = rng.choice(targets).address
            roll = rng.random()
            if roll < 0.45:
                await self.op(http, "put", rng.choice(own), node)
            elif roll < 0.55:
                await self.op(http, "delete", rng.choice(own), node)
            else:
                await self.op(http, "read", rng.choice(everything), node)
            await asyncio.sleep(rng.random() * 0.02)  # pacing only: a 2-core box runs the nodes too

    async def op(self, http: aiohttp.ClientSession, kind: str, key: str, node: str) -> Op:
        index = 0
        if kind != "read":
            index = self.writes[key] = self.writes.get(key, 0) + 1
        op = Op(kind, key, index, node, self.now())
        url = f"http://{node}/kv/{key}"
        try:
            if kind == "read":
                request = http.get(url)
            elif kind == "put":
                request = http.put(url, data=f"{key}#{index}".encode())
            else:
                request = http.delete(url)
            async with request as resp:
                body = await resp.read()
                op.code = resp.status
                if resp.status == 200:
                    op.status = "ok"
                    op.value = body.decode() if kind == "read" else None
                elif resp.status == 404:
                    op.status = "missing"
                else:
                    op.status = "fail"
        except (aiohttp.ClientError, TimeoutError, OSError):
            op.status = "timeout"
        op.end = self.now()
        self.history.append(op)
        return op

    async def read_everywhere(self, members: list[Member]) -> dict[str, dict[str, str | Exception | None]]:
        """Every key read through every member: key -> node -> value (None if missing, the error if
        the read failed)."""
        found: dict[str, dict[str, str | Exception | None]] = {}
        async with aiohttp.ClientSession(timeout=self.timeout) as http:
            for keys in self.keys:
                for key in keys:
                    for member in members:
                        answer: str | Exception | None
                        try:
                            async with http.get(f"http://{member.address}/kv/{key}") as resp:
                                body = (await resp.read()).decode()
                                if resp.status == 200:
                                    answer = body
                                elif resp.status == 404:
                                    answer = None
                                else:
                                    answer = RuntimeError(f"{resp.status} {body}")
                        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                            answer = exc
                        found.setdefault(key, {})[member.address] = answer
        return found


async def ring_settled(members: list[Member]) -> bool:
    """Whether the first member's survey finds exactly ``members`` up and every successor list exact."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://{members[0].address}/ring") as resp,
        ):
            if resp.status != 200:
                return False
            view = orjson.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
    up = {m["address"] for m in view["members"] if m["state"] == "up"}
    return bool(view["settled"]) and up == {m.address for m in members}


async def converge(
    client: Client, members: list[Member], limit: float
) -> tuple[float | None, dict[str, str | None]]:
    """Wait until the ring of ``members`` settled and every member reads the same value of every key;
    the seconds that took (None if not within ``limit``) and the agreed values. If they never agree,
    each key's value is the one most members read (a key no member could read counts as missing)."""
    start = time.monotonic()
    found: dict[str, dict[str, str | Exception | None]] = {}
    while time.monotonic() - start < limit:
        if await ring_settled(members):
            found = await client.read_everywhere(members)
            agreed: dict[str, str | None] = {}
            for key, answers in found.items():
                values = set(answers.values())
                value = next(iter(values))
                if len(values) != 1 or isinstance(value, Exception):
                    break
                agreed[key] = value
            else:
                return time.monotonic() - start, agreed
        await asyncio.sleep(0.5)
    found = found or await client.read_everywhere(members)
    final: dict[str, str | None] = {}
    for key, answers in found.items():
        read = [a for a in answers.values() if not isinstance(a, Exception)]
        final[key] = max(read, key=read.count) if read else None
    return None, final


# -- the checker ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What the checker found in one history."""

    operations: int = 0
    acknowledged: int = 0
    failed: int = 0  # answered with an error (503 mostly)
    timeouts: int = 0
    unexpected: int = 0  # error answers other than 503, 504 and 413
    stale: int = 0  # reads older than a write acknowledged before they started, or going back in time
    late: int = 0  # reads of a write that failed, after a later write was acknowledged
    resurrected: int = 0  # a deleted key read back (or left) with a value older than its delete
    lost: int = 0  # keys whose final value is older than their last acknowledged write
    unavailable: int = 0  # seconds in which most operations failed
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


def _index(value: str | None) -> int | None:
    return None if value is None else int(value.rsplit("#", 1)[1])


def check(history: list[Op], final: dict[str, str | None]) -> Verdict:
    """Judge ``history`` (and the converged ``final`` values) against the promise: no acknowledged write
    lost, no read older than a write acknowledged before it began, no deleted key back, and every failure
    reported as one."""
    verdict = Verdict(operations=len(history))
    by_key: dict[str, list[Op]] = {}
    seconds: dict[int, list[bool]] = {}
    for op in history:
        by_key.setdefault(op.key, []).append(op)
        good = op.status in ("ok", "missing")
        seconds.setdefault(int(op.start), []).append(good)
        if op.kind != "read" and op.status == "ok":
            verdict.acknowledged += 1
        if op.status == "fail":
            verdict.failed += 1
            if op.code not in (503, 504, 413):
                verdict.unexpected += 1
        elif op.status == "timeout":
            verdict.timeouts += 1
    verdict.unavailable = sum(1 for flags in seconds.values() if flags.count(False) * 2 > len(flags))
    for key, ops in by_key.items():
        _check_key(key, ops, final.get(key), verdict)
    return verdict


def _check_key(key: str, ops: list[Op], final: str | None, verdict: Verdict) -> None:
    """Judge the operations on one key (written by one client, one write at a time)."""
    writes = {op.index: op for op in ops if op.kind != "read" and op.status != "missing"}
    acked = sorted((op.end, op.index) for op in writes.values() if op.status == "ok")

    def last_acked(before: float) -> int:
        best = 0
        for end, index in acked:
            if end < before:
                best = max(best, index)
        return best

    def tolerable_absence(at_least: int, until: float) -> bool:
        """Whether reading "missing" is right when the writes from ``at_least`` on may have applied."""
        if at_least == 0 or writes[at_least].kind == "delete":
            return True
        return any(w.kind == "delete" and w.index > at_least and w.start < until for w in writes.values())

    reads = sorted((op for op in ops if op.kind == "read" and op.status in ("ok", "missing")),
                   key=lambda op: op.start)  # fmt: skip
    seen: list[tuple[float, int]] = []  # (end, index) of value reads, for monotonic reads
    for read in reads:
        floor = last_acked(read.start)
        got = _index(read.value)
        if got is None:
            if not tolerable_absence(floor, read.end):
                verdict.stale += 1
                verdict.note(f"{key}: read missing at {read.start:.2f} via {read.node}; #{floor} acked")
            continue
        if got not in writes or writes[got].start > read.end:
            verdict.stale += 1
            verdict.note(f"{key}: read #{got}, never written before {read.end:.2f}")
        elif got < floor:
            if writes[got].status == "ok":
                verdict.stale += 1
                if writes[floor].kind == "delete":
                    verdict.resurrected += 1
                verdict.note(f"{key}: read #{got} at {read.start:.2f} via {read.node}; #{floor} acked")
            else:
                verdict.late += 1
        else:
            before = max((i for end, i in seen if end < read.start), default=0)
            if got < before and writes[got].status == "ok":
                verdict.stale += 1
                verdict.note(f"{key}: read #{got} at {read.start:.2f} after a read of #{before}")
        seen.append((read.end, got))
    floor = max((index for _, index in acked), default=0)
    got = _index(final)
    if got is None:
        if not tolerable_absence(floor, float("inf")):
            verdict.lost += 1
            verdict.note(f"{key}: ends missing; #{floor} acked")
    elif got < floor:
        if writes[floor].kind == "delete":
            verdict.resurrected += 1
            verdict.note(f"{key}: ends as #{got}, deleted by #{floor}")
        elif writes[got].status == "ok":
            verdict.lost += 1
            verdict.note(f"{key}: ends as #{got}; #{floor} acked")
        else:
            verdict.late += 1


# -- schedules -----------------------------------------------------------------------------------------

Schedule = Callable[[Cluster, float, random.Random], Awaitable[None]]


async def _at(fraction: float, seconds: float, started: float) -> None:
    await asyncio.sleep(max(0.0, started + fraction * seconds - time.monotonic()))


def _random_member(cluster: Cluster, rng: random.Random) -> Member:
    return rng.choice(cluster.live())


async def _window(cluster: Cluster, seconds: float, fault: Callable[[], None], until: float) -> None:
    """Inject ``fault`` a fifth into the run, and heal everything at ``until`` (a fraction of the run)."""
    t0 = time.monotonic()
    await _at(0.2, seconds, t0)
    fault()
    await _at(until, seconds, t0)
    cluster.heal()


def _shuffled(cluster: Cluster, rng: random.Random) -> list[Member]:
    members = cluster.live()
    rng.shuffle(members)
    return members


async def partition_one(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """One node cut off from the rest for 40% of the run."""

    def cut() -> None:
        alone = _random_member(cluster, rng)
        cluster.partition([alone], [m for m in cluster.members if m is not alone])

    await _window(cluster, seconds, cut, 0.6)


async def halves(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """The ring split into a majority and a minority for 40% of the run."""

    def cut() -> None:
        members = _shuffled(cluster, rng)
        cluster.partition(members[: len(members) // 2], members[len(members) // 2 :])

    await _window(cluster, seconds, cut, 0.6)


async def bridge(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """Two sides that cannot reach each other and one node that reaches both, for 40% of the run."""

    def cut() -> None:
        middle, *rest = _shuffled(cluster, rng)
        cluster.bridge(rest[: len(rest) // 2], middle, rest[len(rest) // 2 :])

    await _window(cluster, seconds, cut, 0.6)


async def loss(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """A fifth of the packets between nodes dropped for half the run."""
    await _window(cluster, seconds, lambda: cluster.lose(20), 0.7)


async def slow(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """One node's outgoing link limited to 256 kbit/s (queueing delay) for half the run."""
    await _window(cluster, seconds, lambda: _random_member(cluster, rng).host.shape("256kbit"), 0.7)


async def pause(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """A node paused (SIGSTOP) for a quarter of the run, then resumed; twice. In runs of 20 s or more
    the pause outlasts the failure detector's patience (with the harness's 0.5 s RPC timeout)."""
    t0 = time.monotonic()
    for at in (0.15, 0.55):
        await _at(at, seconds, t0)
        member = _random_member(cluster, rng)
        member.pause()
        await _at(at + 0.25, seconds, t0)
        member.resume()


async def kill_restart(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """kill -9 of a node, restarted (same address and data folder) a fifth of the run later; twice."""
    t0 = time.monotonic()
    for at in (0.15, 0.5):
        await _at(at, seconds, t0)
        member = _random_member(cluster, rng)
        member.kill()
        await _at(at + 0.2, seconds, t0)
        member.start(join=_random_member(cluster, rng))


async def churn(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """A node joins, one leaves gracefully, one is killed with -9 and comes back, one more joins."""
    t0 = time.monotonic()
    await _at(0.1, seconds, t0)
    cluster.add().start(join=_random_member(cluster, rng))
    await _at(0.3, seconds, t0)
    await _random_member(cluster, rng).leave()
    await _at(0.45, seconds, t0)
    victim = _random_member(cluster, rng)
    victim.kill()
    await _at(0.6, seconds, t0)
    victim.start(join=_random_member(cluster, rng))
    await _at(0.7, seconds, t0)
    cluster.add().start(join=_random_member(cluster, rng))


async def skew(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """Nodes started with clocks 20 s ahead and 20 s behind (see SCHEDULE_FLAGS); the one ahead is killed
    with -9 and restarted, and the one behind is cut off and healed."""
    t0 = time.monotonic()
    ahead, behind = cluster.members[1], cluster.members[2]
    await _at(0.2, seconds, t0)
    ahead.kill()
    await _at(0.4, seconds, t0)
    ahead.start(join=cluster.members[0])
    await _at(0.5, seconds, t0)
    cluster.partition([behind], [m for m in cluster.members if m is not behind])
    await _at(0.75, seconds, t0)
    cluster.heal()


async def _fenced_within(member: Member, limit: float) -> float | None:
    """Seconds from ``member``'s start until it was fenced, by the time of its log line saying so (None:
    its ``/status`` did not say it is fenced within ``limit`` seconds of its start)."""
    while time.monotonic() - member.started < limit:
        clock = await member.clock()
        if clock is not None and clock.get("fenced") is True:
            lines = member.log.read_text(errors="replace").splitlines()
            fenced = next((line for line in lines if ": fenced: " in line), None)
            if fenced is None:
                return time.monotonic() - member.started
            # the log's times are the system clock's (the node's skewed clock stamps versions only)
            return _logged_at(fenced) - (time.time() - (time.monotonic() - member.started))
        await asyncio.sleep(0.2)
    return None


def _logged_at(line: str) -> float:
    """The time (seconds) a log line of a node was written, by its leading timestamp."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


async def far_joiner(cluster: Cluster, seconds: float, rng: random.Random, offset: str) -> None:
    """A fifth node whose clock is ``offset`` s off joins at a tenth of the run: refused at join."""
    t0 = time.monotonic()
    await _at(0.1, seconds, t0)
    member = cluster.add(["--clock-offset", offset])
    member.start(join=cluster.members[0])
    assert member.process is not None
    try:
        code = await asyncio.to_thread(member.process.wait, 60)
    except subprocess.TimeoutExpired:
        cluster.notes.append(f"the {offset} s node was not refused at join within 60 s")
        return
    said = [line for line in member.log.read_text(errors="replace").splitlines() if "clock is" in line]
    cluster.notes.append(
        f"the {offset} s node was refused at join after {time.monotonic() - member.started:.1f} s "
        f"(exit status {code}): {said[-1].strip() if said else 'no reason logged'}"
    )


async def drifter(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """The last member's clock drifts (see SCHEDULE_FLAGS): it must be fenced; killed -9 at the end, as
    the reads that judge the run go through the correct members."""
    t0 = time.monotonic()
    member = cluster.members[-1]
    fenced = await _fenced_within(member, max(10.0, seconds))
    cluster.notes.append(
        "the drifting node was not fenced"
        if fenced is None
        else f"the drifting node was fenced {fenced:.1f} s after its start"
    )
    await _at(0.9, seconds, t0)
    member.retired = True
    member.kill()


async def near_clock(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """The last member's clock is 30 s ahead (see SCHEDULE_FLAGS), inside the fence's bound: it serves."""
    fenced = await _fenced_within(cluster.members[-1], seconds)
    cluster.notes.append("the +30 s node was fenced" if fenced else "the +30 s node was never fenced")


async def mixed(cluster: Cluster, seconds: float, rng: random.Random) -> None:
    """A random fault every tenth of the run (partition, pause, kill -9 and restart, loss), each healed
    before the next; never more than one node down at a time."""
    t0 = time.monotonic()
    for step in range(1, 9):
        await _at(step / 10, seconds, t0)
        fault = rng.choice(["partition", "pause", "kill", "loss"])
        member = _random_member(cluster, rng)
        if fault == "partition":
            cluster.partition([member], [m for m in cluster.members if m is not member])
        elif fault == "pause":
            member.pause()
        elif fault == "kill":
            member.kill()
        else:
            cluster.lose(15)
        await _at(step / 10 + 0.07, seconds, t0)
        cluster.heal()
        if not member.alive:
            member.start(join=_random_member(cluster, rng))


SCHEDULES: dict[str, Schedule] = {
    "partition-one": partition_one,
    "halves": halves,
    "bridge": bridge,
    "loss": loss,
    "slow": slow,
    "pause": pause,
    "kill-restart": kill_restart,
    "churn": churn,
    "skew": skew,
    "skew+120": functools.partial(far_joiner, offset="120"),
    "skew-120": functools.partial(far_joiner, offset="-120"),
    "skew+30": near_clock,
    "drift+": drifter,
    "drift-": drifter,
    "mixed": mixed,
}
SCHEDULE_FLAGS: dict[str, dict[int, list[str]]] = {
    "skew": {1: ["--clock-offset", "20"], 2: ["--clock-offset", "-20"]},
    "skew+30": {-1: ["--clock-offset", "30"]},
    "drift+": {-1: ["--clock-drift", "12"]},  # 48 s ahead (the fence's bound) 4 s after its start
    "drift-": {-1: ["--clock-drift", "-12"]},
}
"""Extra flags of some members (by position; -1 is the last) for a schedule."""
LATE_JOINERS = {"skew+120", "skew-120"}
"""Schedules whose last node joins during the run (the ring forms without it)."""


@dataclass
class Outcome:
    """One schedule's run: its settings, the verdict and the time to converge after healing."""

    schedule: str
    storage: str
    replication: str
    nodes: int
    seconds: float
    verdict: Verdict
    converged: float | None
    logs: Path
    notes: list[str] = field(default_factory=list)


async def run_schedule(
    name: str,
    folder: Path,
    *,
    nodes: int = 5,
    seconds: float = 30.0,
    storage: str = "memory",
    replication: str = "successor",
    seed: int = 1,
    workers: int = 6,
    keys_per_worker: int = 4,
) -> Outcome:
    """Form a ring of ``nodes`` in namespaces, run the client for ``seconds`` while the schedule injects
    its faults, heal, wait for convergence, and check the history."""
    rng = random.Random(seed)
    net = Network()
    cluster = Cluster(net, folder, ["--replication", replication], data=storage == "sqlite")
    try:
        flags = SCHEDULE_FLAGS.get(name, {})
        formed = nodes - 1 if name in LATE_JOINERS else nodes
        for i in range(formed):
            member = cluster.add(flags.get(i, flags.get(i - formed, [])))
            member.start(join=cluster.members[0] if i else None)
            if i == 0:
                await until(lambda: ring_settled(cluster.members[:1]), "the first node", 30, interval=0.3)
        await until(lambda: ring_settled(cluster.members), "the ring to form", 60, interval=0.3)
        client = Client(cluster, workers=workers, keys_per_worker=keys_per_worker, seed=seed)
        await asyncio.gather(client.run(seconds), SCHEDULES[name](cluster, seconds, rng))
        cluster.heal()
        for member in cluster.members:
            killed = member.process is not None and member.process.returncode == -9
            if killed and not member.alive and not member.retired:
                member.start(join=cluster.live()[0])  # a node killed at the very end comes back too
        converged, final = await converge(client, cluster.live(), 90)
        dump(client.history, folder / "history.jsonl")
        verdict = check(client.history, final)
        return Outcome(name, storage, replication, nodes, seconds, verdict, converged, folder, cluster.notes)
    finally:
        cluster.stop()
        net.close()


def dump(history: list[Op], path: Path) -> None:
    """Write ``history`` as JSON lines (for reading a failure afterwards)."""
    path.write_bytes(b"\n".join(orjson.dumps(op.__dict__) for op in history))
