"""What the benchmark scripts share: their tables, their ``--seed``/``--json``/``--baseline`` options and
files, and, for the scripts that start servers, ports, waits with a deadline and groups of processes.

- Reports: :func:`table` prints one Markdown table; :func:`machine`, :func:`errors` and
  :func:`percentile` make the cells and header lines several scripts print alike.
- Files: :func:`add_common_arguments` adds the options every script takes; :func:`write_json` saves a
  run's rows for a later ``--baseline``, and :class:`Baseline` finds each row of that earlier run again
  and renders it (or this run's figure over it, :func:`ratio`) as a table cell.
- Inputs: :func:`make_keys` draws seeded keys; :func:`addresses` seeded node names for the in-process
  network.
- Processes: :class:`Fleet` starts server processes, each logging to its own file, and kills them all
  on exit; :func:`free_port` picks a port on 127.0.0.1; :func:`until` and :meth:`Fleet.wait_until` poll
  a condition until a deadline; :class:`BenchError` is a run that cannot be trusted, and :func:`failed`
  turns it (or an interrupt) into the exit status the scripts document.

Every server these helpers start or reach listens on 127.0.0.1 only (the names :func:`addresses` makes
are never dialled).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from balancer.keyspace import KeySpace

__all__ = [
    "HOST",
    "SEED",
    "Baseline",
    "BenchError",
    "Fleet",
    "add_common_arguments",
    "addresses",
    "errors",
    "failed",
    "free_port",
    "http_get",
    "machine",
    "make_keys",
    "percentile",
    "ratio",
    "read_json",
    "sigterm_interrupts",
    "table",
    "until",
    "write_json",
]

HOST = "127.0.0.1"
"""The only address the benchmarks' servers listen on."""
SEED = 20261125
"""The default ``--seed`` of most scripts."""
START_TIMEOUT = 30.0
"""Seconds a server process may take to answer after it is started."""

Row = Mapping[str, Any]
"""One row of a benchmark's results, as ``--json`` saves it."""


class BenchError(Exception):
    """A process of the benchmark failed to start or to run, or something it waited for did not happen in
    time; the figures cannot be trusted."""


# -- reports ---------------------------------------------------------------------------------------


def table(head: Sequence[str], lines: Iterable[Sequence[str]]) -> None:
    """Print one Markdown table, then a blank line."""
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print(flush=True)


def machine() -> str:
    """``2 cores, Python 3.11.7, Linux 6.1.0, 2026-11-29``: what a header line says the run ran on."""
    return (
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {platform.system()} "
        f"{platform.release()}, {datetime.date.today()}"
    )


def errors(raised: Mapping[str, int]) -> str:
    """``RingError x3``-style summary of exceptions counted by name, or ``0``."""
    return ", ".join(f"{name} x{k}" for name, k in sorted(raised.items())) or "0"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) of ``values`` by nearest rank; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


# -- files: --json and --baseline ------------------------------------------------------------------


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    seed: int | None = SEED,
    saved: str = "rows",
    compare: str | None = None,
) -> None:
    """Add ``--seed`` (unless ``seed`` is None), ``--json`` and ``--baseline`` to ``parser``.

    ``saved`` names what the file holds (``rows``, ``figures``); ``compare`` the figure a baseline is
    compared on (``puts/s``), where there is one.
    """
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--json", help=f"write the {saved} to this file")
    what = f"{compare} " if compare else ""
    parser.add_argument("--baseline", help=f"compare {what}with {saved} saved by --json")


def read_json(path: str | Path) -> Any:
    """What ``path`` holds, as :func:`write_json` wrote it."""
    return json.loads(Path(path).read_text())


def write_json(path: str | Path | None, data: Any, *, indent: int = 1) -> None:
    """Save ``data`` (a run's rows or figures) to ``path`` for a later ``--baseline``; nothing without
    a path."""
    if path:
        Path(path).write_text(json.dumps(data, indent=indent))


def ratio(new: float, old: float | None, fmt: str = ".2f") -> str:
    """``new`` over ``old`` as one cell, ``1.05x``; ``-`` when there is no ``old`` (or it is 0)."""
    return f"{new / old:{fmt}}x" if old else "-"


class Baseline:
    """The rows of an earlier run, each found again by ``key``: what names a row the same way in every
    run (``"64/fingers alone"``). False when there are none, so a table adds its baseline columns only
    when a baseline was given."""

    def __init__(self, rows: Iterable[Row], key: Callable[[Row], str]) -> None:
        self.key = key
        self.rows = {key(row): row for row in rows}

    @classmethod
    def load(cls, path: str | Path | None, key: Callable[[Row], str]) -> Baseline:
        """The rows ``--json`` saved to ``path``; none without a path."""
        return cls(read_json(path) if path else [], key)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def get(self, row: Row) -> Row | None:
        """The earlier run's row for ``row``, if it had one."""
        return self.rows.get(self.key(row))

    def column(self, row: Row, render: Callable[[Row], str]) -> list[str]:
        """The baseline cell of ``row``, as a list to splice into the row's cells: none without a
        baseline, ``-`` where the baseline has no such row, else ``render`` of the baseline's row."""
        if not self:
            return []
        old = self.get(row)
        return ["-"] if old is None else [render(old)]

    def figure(self, row: Row, name: str, fmt: str, scale: float = 1) -> list[str]:
        """:meth:`column` with the baseline's ``name`` (times ``scale``) formatted by ``fmt``; ``-``
        where the baseline's row has no value."""

        def render(old: Row) -> str:
            value = old.get(name)
            if value is None:
                return "-"
            return format(value * scale if scale != 1 else value, fmt)

        return self.column(row, render)

    def ratio(self, row: Row, name: str, fmt: str = ".2f") -> str:
        """``row``'s ``name`` over the baseline's as one cell (see :func:`ratio`)."""
        old = self.get(row)
        return ratio(row[name], None if old is None else old.get(name), fmt)


# -- keys and addresses ----------------------------------------------------------------------------


def make_keys(count: int, seed: int) -> list[str]:
    """``count`` distinct seeded keys, ``user:`` and 12 hex digits."""
    rng = random.Random(seed)
    keys: dict[str, None] = {}
    while len(keys) < count:
        keys[f"user:{rng.getrandbits(48):012x}"] = None
    return list(keys)


def addresses(n: int, rng: random.Random, space: KeySpace) -> list[str]:
    """``n`` seeded addresses whose ids in ``space`` (their hashes) are distinct: names of nodes on the
    in-process network, never dialled."""
    seen: set[int] = set()
    result: list[str] = []
    while len(result) < n:
        host = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        address = f"{host}:{rng.randrange(1024, 65536)}"
        ident = space.id(address)
        if ident not in seen:
            seen.add(ident)
            result.append(address)
    return result


# -- processes, ports and deadlines ----------------------------------------------------------------


def free_port(rng: random.Random | None = None) -> int:
    """A port nothing listens on right now, on 127.0.0.1: drawn from ``rng`` if given, else the kernel's.

    Seeded ports make a run's addresses, and so the owners of the keys (hashed with the addresses),
    the same from one run to the next. They are drawn below Linux's ephemeral range (32768 and up) so no
    client connection holds them; after 100 taken ones the kernel picks.
    """
    for port in (rng.randrange(20000, 32000) for _ in range(100)) if rng is not None else ():
        with socket.socket() as sock:
            # as the servers bind (asyncio's default): a port whose last connections are in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# urllib, not aiohttp: polling is synchronous, and no proxy from the environment may stand in between
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes] | None:
    """Status and body of ``GET url``, or None when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, OSError, TimeoutError):
        return None


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float, *, interval: float = 0.05
) -> None:
    """Poll ``check`` every ``interval`` s until it holds; :class:`BenchError` (``what did not happen
    within ...``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(interval)


class Fleet:
    """The server processes of one benchmark phase; a context manager that kills them all on exit.

    Each process logs to its own file under ``logs``; the tail of the log is in the error raised when a
    process dies or does not answer.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, command: Sequence[str], *, setup: Callable[[], object] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` as the process called ``name``; ``setup`` runs in the child before it
        (to set a resource limit, say)."""
        with self.log(name).open("wb") as log:
            # run from the log folder: `python -m` puts the working directory first on sys.path, where
            # nothing of the caller's may shadow a module (a checkout's package would win over PYTHONPATH)
            process = subprocess.Popen(
                list(command),
                cwd=self.logs,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=setup,
            )
        self.processes[name] = process
        return process

    def log(self, name: str) -> Path:
        """The log file of the process ``name``."""
        return self.logs / f"{name}.log"

    def tail(self, name: str, lines: int = 15) -> str:
        """The last lines of a process's log."""
        path = self.log(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raise :class:`BenchError` if a process has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise BenchError(f"{name} exited with status {process.returncode}:\n{self.tail(name)}")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
        """Poll ``check`` until it holds; :class:`BenchError` after ``timeout`` s or if a process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if check():
                return
            time.sleep(0.05)  # polling other processes, with a deadline
        raise BenchError(f"{what} did not happen within {timeout:g} s")

    def wait_answering(self, name: str, url: str) -> None:
        """Wait until ``GET url`` on the process ``name`` answers 200."""

        def answers() -> bool:
            reply = http_get(url, timeout=0.5)
            return reply is not None and reply[0] == 200

        self.wait_until(answers, f"{name} answering {url}")

    def close(self) -> None:
        """Kill every process still running and reap them all."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            # one that will not die within 10 s is left to the OS rather than hang the benchmark
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def sigterm_interrupts() -> None:
    """Make SIGTERM raise KeyboardInterrupt, as SIGINT does, so that a terminated run still kills its
    servers on the way out."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def failed(exc: BenchError | KeyboardInterrupt) -> int:
    """Say on stderr why the run stopped; the exit status for it: 1, or 130 when interrupted."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    print(f"FAILED: {exc}", file=sys.stderr)
    return 1
