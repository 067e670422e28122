"""The built-in REPL plugin: the interactive session of ``balancer repl`` and ``node --cli``, and its
commands (``get``, ``put``, ``delete``, ``dump all``, ``leave``, ...), implemented in :mod:`balancer.repl`.

It is registered like any plugin and answers the ``balancer_repl`` hook last, so an installed plugin can
replace the whole REPL. :mod:`balancer.repl` (and click) load only when a REPL starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import pluggy

from balancer.hookspecs import RingMember, hookimpl

if TYPE_CHECKING:
    import click


@hookimpl(trylast=True)
def balancer_repl(node: RingMember, pm: pluggy.PluginManager, stop: asyncio.Event) -> Awaitable[None]:
    """The click REPL with ``[balancer] CMD->`` prompts."""
    from balancer.repl import run_repl

    return run_repl(node, pm, stop=stop)


@hookimpl(trylast=True)
def balancer_repl_commands(cli: click.Group) -> None:
    """The built-in commands: get, put, delete, dump, leave, help, status, ring, neighbours, exit."""
    from balancer.repl import builtin_commands

    builtin_commands(cli)
