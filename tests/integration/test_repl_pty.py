"""The REPL in a real pseudo-terminal: prompts, answers, line editing and history, then a clean exit."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import aiohttp
from processes import FAST, Cluster, status, until


class Terminal:
    """A process attached to a pseudo-terminal, read with a deadline."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
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
                self.seen += chunk.decode(errors="replace")
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def send(self, line: str) -> None:
        os.write(self.master, line.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        os.close(self.master)


async def test_repl_in_a_terminal(cluster: Cluster) -> None:
    first = cluster.start()
    async with aiohttp.ClientSession() as http:
        await until(lambda: _up(http, first.address), what="the ring's first node")
    command = [sys.executable, "-m", "balancer", "repl", "--join", first.address, *FAST]
    term = Terminal(command)
    try:
        term.expect("type help for the commands")
        term.expect("[balancer] CMD-> ")
        term.send("put city Porto Alegre\r")
        term.expect("[balancer] OUT-> stored: Porto Alegre")
        term.send("get city\r")
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.send("get nowhere\r")
        term.expect("[balancer] OUT-> not found: nowhere")
        term.send("\x1b[A\x1b[A\r")  # up twice: history brings back "get city"
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.send("get citx\x7fy\r")  # backspace edits the line
        term.expect("[balancer] OUT-> value: Porto Alegre")
        term.send("bogus\r")
        term.expect("[balancer] OUT-> unknown command: bogus (try help)")
        term.send("exit\r")
        term.expect("left the ring")
        assert term.process.wait(timeout=20) == 0
        assert "Traceback" not in term.seen
    finally:
        term.close()


async def _up(http: aiohttp.ClientSession, address: str) -> bool:
    return await status(http, address) is not None
