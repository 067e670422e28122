"""The connection gate's rules, with stand-in connections, and the cap fitted to the open-file limit."""

from __future__ import annotations

import logging
from typing import cast

import pytest

from balancer.plugins.connections import ACCEPT_BACKLOG, ConnectionGate, GatedHandler, fitted_cap


class Conn:
    """A stand-in connection: how busy it is, and whether the gate closed it."""

    def __init__(self, busy: int = 0) -> None:
        self.busy = busy
        self.closed = False

    def force_close(self) -> None:
        self.closed = True


def admit(gate: ConnectionGate, conn: Conn) -> bool:
    return gate.admit(cast(GatedHandler, conn))


def test_the_cap_fits_the_open_file_limit() -> None:
    assert fitted_cap(1024, outgoing=100, soft_limit=1024) == 1024 - 100 - 2 * ACCEPT_BACKLOG - 64
    assert fitted_cap(1024, outgoing=100, soft_limit=1 << 16) == 1024
    assert fitted_cap(1024, outgoing=100, soft_limit=256) == 128  # too tight for the headroom: half
    assert fitted_cap(1024, outgoing=100, soft_limit=None) <= 1024


async def test_public_connections_leave_the_reserve_to_ring_ones() -> None:
    gate = ConnectionGate(16, header_timeout=10, reserve=4)
    ring = Conn()
    assert admit(gate, ring)
    gate.promote(cast(GatedHandler, ring))
    public = [Conn() for _ in range(12)]
    assert all(admit(gate, c) for c in public)
    assert not any(c.closed for c in public)
    newcomer = Conn()
    assert admit(gate, newcomer)  # over the public share: the oldest idle public one makes room
    assert public[0].closed
    assert not ring.closed
    assert (gate.open, gate.ring, gate.counts["evicted"]) == (13, 1, 1)


async def test_a_busy_crowd_means_the_newcomer_is_refused() -> None:
    gate = ConnectionGate(16, header_timeout=10, reserve=4)
    busy = [Conn(busy=1) for _ in range(12)]
    assert all(admit(gate, c) for c in busy)
    newcomer = Conn()
    assert not admit(gate, newcomer)
    assert not any(c.closed for c in busy)
    assert gate.open == 12
    assert gate.counts["refused"] == 1
    gate.release(cast(GatedHandler, busy[0]))
    assert admit(gate, Conn())


async def test_ring_connections_beyond_the_reserve_still_count_toward_the_cap() -> None:
    gate = ConnectionGate(16, header_timeout=10, reserve=4)
    idle = Conn()
    assert admit(gate, idle)
    for _ in range(15):
        conn = Conn()
        assert admit(gate, conn)
        gate.promote(cast(GatedHandler, conn))
    assert admit(gate, Conn())  # 17 open: the idle public one goes
    assert idle.closed
    assert gate.open == 16


async def test_pressure_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="balancer.plugins.connections")
    gate = ConnectionGate(16, header_timeout=10, interval=3600)
    for _ in range(10_000):
        gate.note("refused")
    gate.note("accept_failed")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1  # the first event at once; the rest wait for the interval's end
    assert "1 refused" in lines[0]
    gate.flush()  # what the timer does at the interval's end
    assert len(caplog.records) == 2
    assert "1 accept failed, 9999 refused" in caplog.records[1].getMessage()
    gate.close()
    assert gate.counts == {"refused": 10_000, "accept_failed": 1}
