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
import io
import shlex
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import click
import pluggy

from balancer.errors import BalancerError, KeyNotFoundError, QuorumError
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
    "split_line",
]

PROMPT = "[balancer] CMD-> "
OUT = "[balancer] OUT-> "


class Session:
    """What a REPL command works with: the ``node``, and ``say`` to answer the user."""

    def __init__(self, node: RingMember, write: Callable[[str], None], *, interactive: bool = False) -> None:
        self.node = node
        self.done = False
        self.interactive = interactive
        """Whether the user is at a terminal (Ctrl-C cancels; prompts are drawn by prompt_toolkit)."""
        self.running: asyncio.Future[None] | None = None
        """The command running now, if any."""
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
    clock = status.get("clock")
    if isinstance(clock, dict):
        rows.append(("clock", _clock_line(clock)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _clock_line(clock: dict[str, Any]) -> str:
    """``/status``'s ``clock`` in a few words: the offset to the ring's, and whether it is fenced."""
    try:
        ahead, error, peers = float(clock["ahead"]), float(clock["error"]), int(clock["peers"])
    except (KeyError, TypeError, ValueError):
        return "-"
    if not peers:
        return "no peer measured yet"
    line = f"{ahead:+.1f} s from the ring's (+-{error:.1f} s, {peers} peers)"
    return f"FENCED: {line}, beyond {clock.get('bound')} s" if clock.get("fenced") else line


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
                f"{m.get('state')}, clock fenced" if m.get("fenced") else str(m.get("state")),
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
    """Add the built-in commands to ``cli``: get, put, delete, dump, leave, help, status, ring,
    neighbours, exit (and its alias quit)."""

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
        """put KEY VALUE: store VALUE under KEY; quote either to keep its spaces (put "my key" "a b"),
        or give the value unquoted: the rest of the line, spaces included."""
        try:
            await session.node.put(key, value.encode())
        except QuorumError as exc:
            if exc.operation != "write" or exc.answered == 0:
                raise
            session.say(
                f"not acknowledged: stored on {exc.answered} of {exc.needed} required replicas; "
                "it may still appear"
            )
            return
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
        if not session.node.member:
            session.say("this client is not a ring member: nothing to leave (exit closes it)")
            return
        await session.node.leave()
        session.say("left the ring")
        session.done = True

    @cli.command(name="exit")
    def exit_() -> None:
        """exit: leave the ring gracefully and stop (as leave does); quit does the same."""
        _session().done = True

    cli.add_command(exit_, name="quit")

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
    @click.argument("name", required=False)
    def help_(name: str | None) -> None:
        """help [COMMAND]: list the commands, or say what one does and how to call it."""
        session = _session()
        if name is None:
            for command in sorted(cli.commands):
                session.say((cli.commands[command].help or command).splitlines()[0])
            session.say("help COMMAND says more; Ctrl-C cancels a line or a command, Ctrl-D leaves")
            return
        found = cli.commands.get(name)
        if found is None:
            session.say(f"unknown command: {name} (try help)")
            return
        session.say(_usage(found, name))
        session.say(" ".join((found.help or "").partition(":")[2].split()) or "(no description)")


def _usage(command: click.Command | None, name: str) -> str:
    if command is None:
        return f"unknown command: {name} (try help)"
    return f"usage: {(command.help or name).split(':')[0]}"


def split_line(line: str) -> list[str]:
    """A command line's words, with shell-style quoting (``get "my key"``). ``put``'s value is the rest
    of the line as typed (``put key value with  spaces``, as the seed tool had it), or one quoted string
    (``put "my key" "a value"``); a word whose quotes do not close is taken as typed."""
    name, _, rest = line.strip().partition(" ")
    if name != "put":
        try:
            return shlex.split(line)
        except ValueError:  # an apostrophe in a word, say: no quoting meant
            return line.split()
    stream = io.StringIO(rest.strip())
    lexer = shlex.shlex(stream, posix=True)
    lexer.whitespace_split = True
    try:
        key = lexer.get_token()
        value = stream.read().strip()  # what follows the key, as typed
    except ValueError:
        key, _, value = rest.strip().partition(" ")
    if value[:1] in ("'", '"'):
        with contextlib.suppress(ValueError):
            if len(words := shlex.split(value)) == 1:
                value = words[0]
    return [name, key, value] if key and value else [name, key] if key else [name]


async def execute(commands: click.Group, session: Session, line: str) -> None:
    """Run one line of input; every failure becomes an answer, never a traceback."""
    words = split_line(line)
    if not words:
        return
    name = words[0]
    command = commands.commands.get(name)
    try:
        result = commands.main(words, prog_name="", standalone_mode=False, obj=session)
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


SLOW = 1.0
"""Seconds a command runs before the REPL says it is waiting for it."""


class _Cancelled(Exception):
    """Ctrl-C at a prompt with text on it: the line is dropped."""


class _Interrupted(Exception):
    """Ctrl-C at an empty prompt (not KeyboardInterrupt, which a task would pass on to the event loop)."""


class _Terminal:
    """Lines from a terminal, read with prompt_toolkit (editing, history, Ctrl-C and Ctrl-D as keys),
    without a thread. Ctrl-C drops the line being typed; at an empty prompt it raises _Interrupted."""

    def __init__(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        @keys.add("c-c")
        def _interrupt(event: Any) -> None:
            empty = not event.app.current_buffer.text
            event.app.exit(exception=_Interrupted() if empty else _Cancelled())

        self._prompt: Any = PromptSession(key_bindings=keys)

    async def next_line(self) -> str | None:
        try:
            line: str = await self._prompt.prompt_async(PROMPT, handle_sigint=False)  # ours: see run_repl
        except EOFError:  # Ctrl-D
            return None
        return line


class _Pipe:
    """Lines from a pipe or file, as sent: each prompt is written before the line is read, so transcripts
    read as at a terminal. Reads block, so they run on a daemon thread, which never holds the process
    open."""

    def __init__(self, source: TextIO, write: Callable[[str], None]) -> None:
        self._source, self._write = source, write

    async def next_line(self) -> str | None:
        self._write(PROMPT)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def read() -> None:
            raw = self._source.readline()
            line = raw.rstrip("\n") if raw else None

            def deliver() -> None:
                if not future.done():
                    future.set_result(line)

            loop.call_soon_threadsafe(deliver)

        threading.Thread(target=read, daemon=True).start()
        return await future


async def _warn_if_small(session: Session) -> None:
    """Say once, at start, if the ring has fewer members than a write needs."""
    with contextlib.suppress(BalancerError):
        status = await session.node.status()
        settings = status.get("settings") or {}
        needed = settings.get("write_quorum")
        view = await session.node.ring_view()
        up = sum(1 for m in view.get("members") or [] if m.get("state") in ("up", "suspect"))
        if isinstance(needed, int) and up < needed:
            session.say(
                f"the ring has {up} member{'s' if up != 1 else ''} and a write needs {needed}: "
                "writes will fail until more nodes join"
            )


async def _run_command(commands: click.Group, session: Session, line: str) -> None:
    """Run one line as a task (which Ctrl-C cancels at a terminal); say so if it is slow."""
    task = session.running = asyncio.ensure_future(execute(commands, session, line))
    try:
        done, _ = await asyncio.wait({task}, timeout=SLOW)
        if not done:
            session.say("waiting for the ring..." + (" (Ctrl-C cancels)" if session.interactive else ""))
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        session.say("cancelled (a write may still complete)")
    finally:
        session.running = None


async def run_repl(
    node: RingMember,
    pm: pluggy.PluginManager,
    *,
    source: TextIO | None = None,
    write: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Read and run commands until ``exit``, ``leave``, end of input (Ctrl-D), a second Ctrl-C at an
    empty prompt, or ``stop`` is set.

    At a terminal, Ctrl-C drops the line being typed, or cancels the command that is running. A member
    is left gracefully at the end unless a command already left it (a client is closed).
    """

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = write or echo
    source = source or sys.stdin
    interactive = source is sys.stdin and sys.stdin.isatty() and sys.stdout.isatty()
    session = Session(node, out, interactive=interactive)
    commands = build_commands(pm)
    reader = _Terminal() if interactive else _Pipe(source, out)
    stop = stop or asyncio.Event()
    stopping = asyncio.ensure_future(stop.wait())
    interrupted = False  # the last thing typed was Ctrl-C at an empty prompt
    loop = asyncio.get_running_loop()
    if interactive:  # Ctrl-C while a command runs (the terminal is not in raw mode then) cancels it
        loop.add_signal_handler(signal.SIGINT, lambda: _interrupt(session, stop))
    try:
        await _warn_if_small(session)
        while not session.done:
            reading = asyncio.ensure_future(reader.next_line())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Interrupted, _Cancelled):
                    await reading
                break
            try:
                line = reading.result()
            except _Cancelled:
                interrupted = False
                continue
            except _Interrupted:
                if interrupted:
                    break
                interrupted = True
                session.say("(Ctrl-C again, or Ctrl-D, leaves)")
                continue
            interrupted = False
            if line is None:
                out("\n")
                break
            await _run_command(commands, session, line)
    finally:
        stopping.cancel()
        if interactive:
            loop.add_signal_handler(signal.SIGINT, stop.set)  # as the CLI has it: SIGINT stops the node
        if not node.stopped:
            await node.leave()


def _interrupt(session: Session, stop: asyncio.Event) -> None:
    """SIGINT at a terminal: cancel the running command, or stop if none runs."""
    if session.running is not None and not session.running.done():
        session.running.cancel()
    else:
        stop.set()
