"""The REPL in a real pseudo-terminal: prompts, answers, line editing and history, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import aiohttp
from processes import FAST, Cluster, status, until

ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")
"""Terminal control sequences (cursor moves, colours, modes): the screen text is what is left."""


def _control_terminal() -> None:
    """In the child, after its new session began: make its standard input its controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A process attached to a pseudo-terminal, read with a deadline. It answers cursor-position
    requests as a terminal does, and keeps the text it shows without control sequences."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            command,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
            env=env,
            start_new_session=True,  # a session of its own, whose controlling terminal this is:
            preexec_fn=_control_terminal,  # so Ctrl-C typed in cooked mode sends it SIGINT
        )
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 20.0) -> str:
        """Read until ``text`` has appeared after what was already consumed; returns what was read."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not appear; the screen shows:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the process closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{text!r} did not appear before the end; screen:\n{self.seen}")
                shown = chunk.decode(errors="replace")
                for _ in range(shown.count("\x1b[6n")):  # where is the cursor? (any answer will do)
                    os.write(self.master, b"\x1b[1;1R")
                self.seen += ESCAPES.sub("", shown)
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def send(self, keys: str) -> None:
        """Type ``keys`` now."""
        os.write(self.master, keys.encode())

    def type(self, keys: str) -> None:
        """Type ``keys`` at the next prompt, as a person does: once it shows. prompt_toolkit draws a
        prompt, asks where the cursor is, and draws it again with the answer; by then it is ready for
        every key (its history is loaded), as it always is for a person, who is far slower."""
        self.expect("[balancer] CMD->")
        self.expect("[balancer] CMD->")
        self.send(keys)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self.master)


HANGING_COMMAND = """
import asyncio
import click
from balancer.hookspecs import hookimpl

@hookimpl
def balancer_repl_commands(cli):
    @cli.command()
    def hang():
        "hang: wait until cancelled"
        return asyncio.Event().wait()
"""
"""A plugin whose REPL command never ends by itself."""


def install_plugin(folder: Path) -> dict[str, str]:
    """Write the hanging command's plugin module under ``folder``; the environment that can import it."""
    (folder / "hanging.py").write_text(HANGING_COMMAND)
    return {**os.environ, "PYTHONPATH": str(folder)}


async def test_repl_in_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    first = cluster.start()
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, first.address), what="the ring's first node")
    command = [
        sys.executable,
        "-m",
        "balancer",
        "repl",
        "--join",
        first.address,
        *FAST,
        "--plugin",
        "hanging",
    ]
    term = Terminal(command, env=install_plugin(tmp_path))
    try:
        term.expect("type help for the commands")
        term.type("put city Porto Alegre\r")
        term.expect("[balancer] OUT-> stored: Porto Alegre")
        term.type("get city\r")
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.type("get nowhere\r")
        term.expect("[balancer] OUT-> not found: nowhere")
        term.type("\x1b[A\x1b[A\r")  # up twice: history brings back "get city"
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.type("get citx\x7fy\r")  # backspace edits the line
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.type("bogus\r")
        term.expect("[balancer] OUT-> unknown command: bogus (try help)")
        term.type('put "my key" "two  words"\r')
        term.expect("[balancer] OUT-> stored: two  words")
        term.type("help quit\r")
        term.expect("[balancer] OUT-> usage: exit")
        term.type("get cit\x03")  # Ctrl-C drops the line being typed
        term.type("get city\r")
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.type("hang\r")  # a command that runs until cancelled: the REPL says it waits
        term.expect("[balancer] OUT-> waiting for the ring... (Ctrl-C cancels)")
        term.send("\x03")  # Ctrl-C cancels it, and the node goes on
        term.expect("[balancer] OUT-> cancelled")
        term.type("get city\r")
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.type("\x03")  # at an empty prompt: a hint, not an exit
        term.expect("[balancer] OUT-> (Ctrl-C again, or Ctrl-D, leaves)")
        term.type("get city\r")  # anything else in between: the next Ctrl-C hints again
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.type("\x03")
        term.expect("(Ctrl-C again, or Ctrl-D, leaves)")
        term.type("\x03")
        term.expect("left the ring")
        assert term.process.wait(timeout=20) == 0
        assert "Traceback" not in term.seen
    finally:
        term.close()


async def test_ctrl_d_leaves(cluster: Cluster) -> None:
    first = cluster.start()
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, first.address), what="the ring's first node")
    term = Terminal([sys.executable, "-m", "balancer", "repl", "--join", first.address, *FAST])
    try:
        term.type("put k v\r")
        term.expect("[balancer] OUT-> stored: v")
        term.type("\x04")
        term.expect("left the ring")
        assert term.process.wait(timeout=20) == 0
    finally:
        term.close()


async def _up(http: aiohttp.ClientSession, address: str) -> bool:
    return await status(http, address) is not None
