"""The memory storage's packed layout: groups that split as the store grows, entries found among look-alike
bytes, wide versions, scans that run while writes split groups, and what a record costs.

The storage contract itself (shared with sqlite) is checked in ``test_storage.py``.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.keyspace import hash_key, in_interval
from balancer.plugins.memory_storage import GROUP_SIZE, MemoryStorage
from balancer.types import Record, Version


def _random_record(rng: random.Random, keys: list[bytes]) -> Record:
    key = rng.choice(keys)
    value = None if rng.random() < 0.2 else rng.randbytes(rng.randrange(0, 40))
    wide = rng.random() < 0.1  # versions beyond 64 bits take the entries' wide form
    timestamp = rng.randrange(1 << 70) if wide else rng.randrange(1, 50)
    writer = rng.randrange(1 << 100) if wide else rng.randrange(3)
    return Record(key, value, Version(timestamp, writer))


@pytest.mark.parametrize("bits", [8, 64, 160])
async def test_behaves_as_a_dict_of_greatest_versions(bits: int) -> None:
    """Seeded random puts, removes and range scans agree with a plain model of the contract."""
    rng = random.Random(bits)
    store = MemoryStorage(bits=bits)
    size = 1 << bits
    keys = [rng.randbytes(rng.randrange(1, 24)) for _ in range(600)]
    model: dict[bytes, Record] = {}
    for step in range(4000):
        record = _random_record(rng, keys)
        if rng.random() < 0.1:  # remove drops only what was not overwritten since
            held = model.get(record.key)
            dropped = held is not None and held.version <= record.version
            assert await store.remove([record]) == int(dropped)
            if dropped:
                del model[record.key]
        else:
            held = model.get(record.key)
            kept = held is None or held.version < record.version
            assert await store.put(record) == kept
            if kept:
                model[record.key] = record
        if step % 400 == 0:
            start, end = rng.randrange(size), rng.randrange(size)
            ids = {k: hash_key(k, bits=bits) for k in model}
            want = {k for k, i in ids.items() if in_interval(i, start, end, size, right_closed=True)}
            got = [r async for batch in store.scan(start, end, batch=5) for r in batch]
            assert len(got) == len(want)
            assert {r.key for r in got} == want
            assert all(model[r.key] == r for r in got)
    assert await store.count() == len(model)
    for key in keys:
        assert await store.get(key) == model.get(key)
    everything = [r async for batch in store.scan() for r in batch]
    assert sorted(everything, key=lambda r: r.key) == sorted(model.values(), key=lambda r: r.key)


async def test_groups_split_one_at_a_time_as_records_arrive() -> None:
    store = MemoryStorage()
    rng = random.Random(3)
    records = [Record(rng.randbytes(16), rng.randbytes(100), Version(i + 1, 1)) for i in range(5000)]
    grown: list[int] = []
    for record in records:
        await store.put(record)
        grown.append(len(store._groups))
    # never a jump (one group splits per GROUP_SIZE new records), and about GROUP_SIZE records per group
    assert all(0 <= later - earlier <= 1 for earlier, later in itertools.pairwise(grown))
    assert 5000 / GROUP_SIZE * 0.9 <= grown[-1] <= 5000 / GROUP_SIZE + 1
    for record in records:
        assert await store.get(record.key) == record
    # every group holds exactly the keys whose ids begin with its prefix
    for group, blob in store._groups.items():
        first, last = store._span(group)
        for record in store._records(blob, None):
            assert first <= hash_key(record.key) <= last


async def test_keys_hidden_in_other_entries_are_not_mistaken_for_entries() -> None:
    store = MemoryStorage(bits=8)  # 8-bit ids: a few hundred keys share few groups
    key = b"needle"
    # values, and longer keys, that contain the key's bytes come first in the same group
    decoys = [Record(b"x" * i, b"needle" * 3, Version(1, 1)) for i in range(1, 300)]
    decoys += [Record(b"needle" + bytes([i]), b"v", Version(1, 1)) for i in range(256)]
    for record in decoys:
        await store.put(record)
    assert await store.get(key) is None
    assert await store.remove([Record(key, None, Version(9, 9))]) == 0
    assert await store.put(Record(key, b"found", Version(2, 2)))
    assert await store.get(key) == Record(key, b"found", Version(2, 2))
    assert not await store.put(Record(key, b"stale", Version(1, 9)))
    for record in decoys:
        assert await store.get(record.key) == record
    assert await store.count() == len(decoys) + 1


async def test_a_scan_sees_every_record_once_while_writes_split_groups() -> None:
    store = MemoryStorage()
    rng = random.Random(5)
    present = [Record(rng.randbytes(16), b"v", Version(1, 1)) for i in range(2000)]
    for record in present:
        await store.put(record)
    seen: list[bytes] = []
    splits = len(store._groups)
    async for batch in store.scan(batch=50):
        seen += [r.key for r in batch]
        for _ in range(40):  # new keys between batches: groups ahead of the scan split
            await store.put(Record(rng.randbytes(16), b"w", Version(1, 1)))
    assert len(store._groups) > splits * 2
    old = {r.key for r in present}
    assert len([k for k in seen if k in old]) == len(old)  # each present record exactly once
    assert len(seen) == len(set(seen))


async def test_a_record_costs_little_more_than_its_bytes() -> None:
    store = MemoryStorage()
    rng = random.Random(7)
    count = 20_000
    for i in range(count):
        await store.put(Record(rng.randbytes(16), rng.randbytes(100), Version((1 << 56) + i, (1 << 63) + 1)))
    groups = store._groups
    held = sys.getsizeof(groups) + sum(sys.getsizeof(g) + sys.getsizeof(b) for g, b in groups.items())
    # 116 bytes of key and value; a 25-byte header and a share of a group's bookkeeping on top
    assert held / count < 116 + 25 + 16


def test_memory_benchmark_runs_small(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
    command = [sys.executable, str(script), "--records", "3000", "--batch", "500", "--ring-nodes", "2"]
    done = subprocess.run(
        [*command, "--json", str(tmp_path / "figures.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for row in ("| RSS with the records |", "| settled pass: longest event-loop stall |"):
        assert row in done.stdout
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["rss loaded"] > figures["rss idle"] > 0
    again = subprocess.run(
        [*command, "--only", "stall", "--baseline", str(tmp_path / "figures.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "vs baseline" in again.stdout
    assert "RSS" not in again.stdout
