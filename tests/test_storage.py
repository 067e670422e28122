"""The storage contract, checked against every built-in storage (sqlite on a real database file)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from balancer.config import Config
from balancer.errors import ConfigError, StorageError
from balancer.hookspecs import Storage
from balancer.plugin import Registry, plugin_manager
from balancer.plugins.memory_storage import MemoryStorage
from balancer.plugins.sqlite_storage import FILENAME, SqliteStorage
from balancer.types import Record, Version


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    made: Storage = (
        MemoryStorage(bits=8) if request.param == "memory" else SqliteStorage(tmp_path / "s.db", bits=8)
    )
    async with made:
        yield made


async def test_keeps_the_greatest_version_and_tombstones(store: Storage) -> None:
    old, new = Version(1, 9), Version(2, 1)
    assert await store.put(Record(b"k", b"new", new))
    assert not await store.put(Record(b"k", b"old", old))  # a stale write loses
    assert not await store.put(Record(b"k", b"same", new))  # an equal version changes nothing
    assert await store.get(b"k") == Record(b"k", b"new", new)
    tomb = Record(b"k", None, Version(3, 1))
    assert await store.put(tomb)
    assert await store.get(b"k") == tomb
    assert not await store.put(Record(b"k", b"zombie", Version(2, 5)))  # no resurrection
    assert await store.count() == 1
    assert await store.get(b"missing") is None


async def test_huge_versions_and_ids_round_trip(store: Storage) -> None:
    version = Version((1 << 63) + 5, (1 << 160) - 1)
    record = Record(b"\x00\xff", b"\x00" * 3, version)
    assert await store.put(record)
    assert await store.get(b"\x00\xff") == record
    assert not await store.put(Record(b"\x00\xff", b"x", Version((1 << 63) + 5, (1 << 160) - 2)))


async def test_remove_drops_only_what_was_not_overwritten(store: Storage) -> None:
    await store.put(Record(b"x", b"1", Version(5, 1)))
    assert await store.remove([Record(b"x", b"1", Version(4, 1))]) == 0
    assert await store.remove([Record(b"x", b"1", Version(5, 1))]) == 1
    assert await store.get(b"x") is None
    assert await store.remove([Record(b"x", b"1", Version(5, 1))]) == 0


async def test_scans_circular_ranges_in_batches(store: Storage) -> None:
    for i in range(300):
        await store.put(Record(f"k{i}".encode(), b"v", Version(1, 1)))
    everything = [r async for batch in store.scan(batch=7) for r in batch]
    assert len(everything) == 300
    assert len({r.key for r in everything}) == 300
    low = [r async for batch in store.scan(200, 50) for r in batch]  # wraps past zero
    high = [r async for batch in store.scan(50, 200, batch=11) for r in batch]
    assert len(low) + len(high) == 300
    assert not {r.key for r in low} & {r.key for r in high}
    whole = [r async for batch in store.scan(99, 99) for r in batch]
    assert len(whole) == 300


async def test_concurrent_writes_keep_the_newest(store: Storage) -> None:
    versions = [Version(t, 1) for t in range(1, 51)]
    await asyncio.gather(
        *(store.put(Record(b"hot", str(v.timestamp).encode(), v)) for v in reversed(versions))
    )
    assert await store.get(b"hot") == Record(b"hot", b"50", Version(50, 1))


async def test_sqlite_keeps_records_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "node" / FILENAME
    async with SqliteStorage(path) as first:
        for i in range(20):
            await first.put(Record(f"k{i}".encode(), f"v{i}".encode(), Version(i + 1, 7)))
        await first.put(Record(b"k3", None, Version(100, 7)))
    assert path.exists()
    async with SqliteStorage(path) as again:
        assert await again.count() == 20
        assert await again.get(b"k5") == Record(b"k5", b"v5", Version(6, 7))
        assert (await again.get(b"k3")) == Record(b"k3", None, Version(100, 7))
    closed = SqliteStorage(path)
    await closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        await closed.get(b"k1")


def test_sqlite_needs_a_data_dir(tmp_path: Path) -> None:
    registry = Registry(plugin_manager(load_entrypoints=False))
    with pytest.raises(ConfigError, match="data folder"):
        registry.storage(Config(storage="sqlite"))
    made = registry.storage(Config(storage="sqlite", data_dir=str(tmp_path)))
    assert isinstance(made, SqliteStorage)
    assert made.path == tmp_path / FILENAME


def _corrupt(folder: Path) -> Path:
    """A folder whose database file holds seeded random bytes instead of a SQLite database."""
    folder.mkdir()
    (folder / FILENAME).write_bytes(random.Random(7).randbytes(8192))
    return folder


@pytest.mark.parametrize("case", ["a file", "under a file", "corrupt", "database is a folder"])
def test_sqlite_refuses_an_unusable_data_dir_at_once(tmp_path: Path, case: str) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a folder")
    if case == "a file":
        folder = plain
    elif case == "under a file":
        folder = plain / "data"
    elif case == "corrupt":
        folder = _corrupt(tmp_path / "corrupt")
    else:
        (tmp_path / "db" / FILENAME).mkdir(parents=True)
        folder = tmp_path / "db"
    registry = Registry(plugin_manager(load_entrypoints=False))
    # the factory opens the database: the error comes now, not on the first request
    with pytest.raises(StorageError, match=r"^cannot use ") as caught:
        registry.storage(Config(storage="sqlite", data_dir=str(folder)))
    assert "\n" not in str(caught.value)


def test_sqlite_refuses_a_folder_it_cannot_write() -> None:
    # /proc refuses new files even to root, unlike permission bits, so this runs under any user
    with pytest.raises(StorageError, match="cannot use"):
        SqliteStorage(Path("/proc/balancer-data") / FILENAME).open()


async def test_sqlite_maps_disk_errors_to_storage_errors(tmp_path: Path) -> None:
    async with SqliteStorage(tmp_path / FILENAME).open() as store:
        await store.put(Record(b"k", b"v", Version(1, 1)))
        await store._run(lambda db: db.execute("DROP TABLE records"))  # the file changed under the node
        with pytest.raises(StorageError, match="no such table"):
            await store.get(b"k")


async def _synchronous(store: SqliteStorage) -> int:
    return await store._run(lambda db: int(db.execute("PRAGMA synchronous").fetchone()[0]))


async def test_fsync_selects_synchronous_full(tmp_path: Path) -> None:
    registry = Registry(plugin_manager(load_entrypoints=False))
    for fsync, expected in ((False, 1), (True, 2)):  # SQLite's codes: 1 NORMAL, 2 FULL
        made = registry.storage(Config(storage="sqlite", data_dir=str(tmp_path / str(fsync)), fsync=fsync))
        assert isinstance(made, SqliteStorage)
        async with made:
            assert await _synchronous(made) == expected
            assert made.fsync is fsync


def test_fsync_needs_a_durable_storage() -> None:
    registry = Registry(plugin_manager(load_entrypoints=False))
    with pytest.raises(ConfigError, match="fsync needs a durable storage"):
        registry.storage(Config(storage="memory", fsync=True))


def test_storage_benchmark_runs_small(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "storage.py"
    command = [sys.executable, str(script), "--puts", "50", "--concurrency", "1,4", "--dir", str(tmp_path)]
    command += ["--json", str(tmp_path / "rows.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for row in ("| memory | 1 | 50 |", "| sqlite | 4 | 50 |", "| sqlite fsync | 1 | 50 |"):
        assert row in done.stdout
    again = subprocess.run(
        [*command[:-2], "--baseline", str(tmp_path / "rows.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "vs baseline" in again.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]  # every database file removed
