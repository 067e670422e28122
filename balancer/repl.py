"""The interactive REPL that the built-in ``repl`` plugin runs: every command is a click command on
one group.

Prompts read ``[balancer] CMD-> `` and answers ``[balancer] OUT-> ...``, as the seed tool printed them.
Plugins add commands through the ``balancer_repl_commands`` hook; a command's callback finds the
:class:`Session` in ``click.get_current_context().obj`` and may return an awaitable, which the REPL
awaits on the node's event loop. The REPL sees the node only through
:class:`~balancer.hookspecs.RingMember`, and the CLI starts it only through the ``balancer_repl`` hook,
so a plugin can replace it whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import click
import pluggy

from balancer.errors import BalancerError, KeyNotFoundError
from balancer.hookspecs import RingMember
from balancer.types import format_id

__all__ = [
    "OUT",
    "PROMPT",
    "Session",
    "build_commands",
    "builtin_commands",
    "format_ring",
    "format_status",
    "pass_session",
    "run_repl",
]

PROMPT = "[balancer] CMD-> "
OUT = "[balancer] OUT-> "


class Session:
    """What a REPL command works with: the ``node``, and ``say`` to answer the user."""

    def __init__(self, node: RingMember, write: Callable[[str], None]) -> None:
        self.node = node
        self.done = False
        self._write = write

    def say(self, text: str) -> None:
        """Print ``text`` as an answer, one ``OUT->`` line per line of text."""
        for line in text.splitlines() or [""]:
            self._write(f"{OUT}{line}\n")


def _session() -> Session:
    session = click.get_current_context().obj
    if not isinstance(session, Session):
        raise click.UsageError("this command runs only inside the REPL")
    return session


def pass_session(func: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Decorate an ``async`` REPL command so that it receives the :class:`Session` first.

    click's context is gone by the time the REPL awaits the command, so the session is taken while
    click still calls the callback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Awaitable[None]:
        return func(_session(), *args, **kwargs)

    return wrapper


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


def format_status(status: dict[str, Any]) -> str:
    """A node's ``/status`` answer as a small readable table."""
    ident = status.get("id")
    with contextlib.suppress(AttributeError, TypeError, ValueError):  # an older node sends it unpadded
        ident = format_id(int(str(ident), 16), int((status.get("settings") or {}).get("bits", 64)))
    rows = [
        ("node", f"{status.get('address')}  id {ident}"),
        ("predecessor", str(status.get("predecessor") or "-")),
        ("successors", ", ".join(status.get("successors") or []) or "-"),
        ("fingers", ", ".join(f["address"] for f in status.get("fingers") or []) or "-"),
        ("records", str(status.get("records"))),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def format_members(ring: dict[str, Any]) -> str:
    """A ``GET /ring`` answer as a table: one row per process (like ``nodetool status``)."""
    members = ring.get("members") or []
    header = (
        f"{ring.get('processes', len(members))} processes, {ring.get('vnodes', 0)} vnodes, "
        f"{'settled' if ring.get('settled') else 'not settled (successor lists still changing)'}"
    )
    rows = [("address", "state", "vnodes", "weight", "records", "share")]
    for m in members:
        share = m.get("share")
        records = m.get("records")
        rows.append(
            (
                str(m.get("address")),
                str(m.get("state")),
                str(m.get("vnodes")),
                f"{m.get('weight', 1):g}",
                "-" if records is None else f"{records:,}",
                "-" if share is None else f"{share:.1%}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join([header, *(line.rstrip() for line in lines)])


def format_ring(node: RingMember) -> str:
    """The nodes this node's first vnode points to, in ring order from itself, each with its role."""
    view = node.view()
    roles: dict[Any, list[str]] = {view.node: ["self"]}
    if view.predecessor is not None:
        roles.setdefault(view.predecessor, []).append("predecessor")
    for i, succ in enumerate(view.successors):
        roles.setdefault(succ, []).append(f"successor {i + 1}")
    for finger in view.fingers:
        roles.setdefault(finger, []).append("finger")
    size = node.space.size
    ordered = sorted(roles, key=lambda n: (n.id - view.node.id) % size)
    bits = node.space.bits
    return "\n".join(
        f"{format_id(n.id, bits)}  {n.address:<21}  {', '.join(dict.fromkeys(roles[n]))}" for n in ordered
    )


def build_commands(pm: pluggy.PluginManager) -> click.Group:
    """The REPL's command group, with every command the plugins add (the built-ins among them)."""

    @click.group(name="", add_help_option=False, context_settings={"help_option_names": []})
    def repl() -> None:
        """balancer REPL commands."""

    pm.hook.balancer_repl_commands(cli=repl)
    return repl


def builtin_commands(cli: click.Group) -> None:
    """Add the built-in commands to ``cli``: get, put, delete, dump, leave, help, status, ring, exit."""

    @cli.command()
    @click.argument("key")
    @pass_session
    async def get(session: Session, key: str) -> None:
        """get KEY: print the value stored under KEY."""
        try:
            session.say(f"value: {_text(await session.node.get(key))}")
        except KeyNotFoundError:
            session.say(f"not found: {key}")

    @cli.command()
    @click.argument("key")
    @click.argument("value")
    @pass_session
    async def put(session: Session, key: str, value: str) -> None:
        """put KEY VALUE: store VALUE (the rest of the line, spaces included) under KEY."""
        await session.node.put(key, value.encode())
        session.say(f"stored: {value}")

    @cli.command()
    @click.argument("key")
    @pass_session
    async def delete(session: Session, key: str) -> None:
        """delete KEY: delete KEY from the ring."""
        try:
            await session.node.delete(key)
            session.say(f"deleted: {key}")
        except KeyNotFoundError:
            session.say(f"not found: {key}")

    @cli.command()
    @click.argument("what", type=click.Choice(["all"]))
    @pass_session
    async def dump(session: Session, what: str) -> None:
        """dump all: list the records this node stores itself."""
        records = sorted(await session.node.local_records(), key=lambda r: r.key)
        live = [r for r in records if r.value is not None]
        for record in live:
            session.say(f"{_text(record.key)} = {_text(record.value or b'')}")
        session.say(f"{len(live)} records here ({len(records) - len(live)} tombstones)")

    @cli.command()
    @pass_session
    async def leave(session: Session) -> None:
        """leave: hand this node's keys to its successor, leave the ring, and stop."""
        await session.node.leave()
        session.say("left the ring")
        session.done = True

    @cli.command(name="exit")
    def exit_() -> None:
        """exit: leave the ring gracefully and stop (as leave does)."""
        _session().done = True

    @cli.command()
    @pass_session
    async def status(session: Session) -> None:
        """status: this node's view: predecessor, successors, fingers, record count."""
        session.say(format_status(await session.node.status()))

    @cli.command()
    @pass_session
    async def ring(session: Session) -> None:
        """ring: every process of the ring: state, vnodes, weight, records, share of the keys."""
        session.say(format_members(await session.node.ring_view()))

    @cli.command()
    def neighbours() -> None:
        """neighbours: the nodes this node points to, in ring order from itself."""
        session = _session()
        session.say(format_ring(session.node))

    @cli.command(name="help")
    def help_() -> None:
        """help: list the commands."""
        session = _session()
        for name in sorted(cli.commands):
            doc = (cli.commands[name].help or name).splitlines()[0]
            session.say(doc)


def _usage(command: click.Command | None, name: str) -> str:
    if command is None:
        return f"unknown command: {name} (try help)"
    return f"usage: {(command.help or name).split(':')[0]}"


async def execute(commands: click.Group, session: Session, line: str) -> None:
    """Run one line of input; every failure becomes an answer, never a traceback."""
    name, _, rest = line.strip().partition(" ")
    if not name:
        return
    command = commands.commands.get(name)
    if name == "put":  # the value is the rest of the line, spaces included
        key, _, value = rest.strip().partition(" ")
        args = [key, value] if key and value else [key] if key else []
    else:
        args = rest.split()
    try:
        result = commands.main([name, *args], prog_name="", standalone_mode=False, obj=session)
        if inspect.isawaitable(result):
            await result
    except click.UsageError:
        session.say(_usage(command, name))
    except click.Abort:
        session.done = True
    except BalancerError as exc:
        session.say(f"error: {exc}")
    except Exception as exc:  # a plugin's command failed; the REPL goes on
        session.say(f"error: {type(exc).__name__}: {exc}")


def _reader(prompt: str, source: TextIO, write: Callable[[str], None]) -> Callable[[], Awaitable[str | None]]:
    """Read lines on a daemon thread (so a blocked read never holds the process open); None at EOF.

    At a terminal, lines come from ``input()`` with the standard library's ``readline`` (editing,
    history), the well-kept line editor every Python has; piped input is read as plain lines, so scripts
    and tests see exactly what they send. Both block, hence the thread. prompt_toolkit would read without
    a thread, but it is a dependency of its own and repaints the screen with escape sequences, which a
    REPL whose answers other tools read line by line does not need.
    """
    loop = asyncio.get_running_loop()
    interactive = source is sys.stdin and sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

    def read(future: asyncio.Future[str | None]) -> None:
        try:
            if interactive:
                line: str | None = input(prompt)
            else:
                write(prompt)
                raw = source.readline()
                line = raw.rstrip("\n") if raw else None
        except EOFError:
            line = None

        def deliver() -> None:
            if not future.done():
                future.set_result(line)

        loop.call_soon_threadsafe(deliver)

    async def next_line() -> str | None:
        future: asyncio.Future[str | None] = loop.create_future()
        threading.Thread(target=read, args=(future,), daemon=True).start()
        return await future

    return next_line


async def run_repl(
    node: RingMember,
    pm: pluggy.PluginManager,
    *,
    source: TextIO | None = None,
    write: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Read and run commands until ``exit``, ``leave``, end of input, or ``stop`` is set.

    The node is left gracefully at the end unless a command already left it.
    """

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = write or echo
    session = Session(node, out)
    commands = build_commands(pm)
    next_line = _reader(PROMPT, source or sys.stdin, out)
    stop = stop or asyncio.Event()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not session.done:
            reading = asyncio.ensure_future(next_line())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                break
            line = reading.result()
            if line is None:
                out("\n")
                break
            await execute(commands, session, line)
    finally:
        stopping.cancel()
        if not node.stopped:
            await node.leave()
