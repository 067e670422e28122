"""The ``sqlite`` storage: records in one SQLite database file in WAL mode, kept across restarts.

Selected with ``Config(storage="sqlite", data_dir=...)`` (the CLI's ``--data-dir``). Every call runs on one
dedicated thread that owns the connection, so the event loop never blocks on disk and writes are
serialized: a put compares versions and writes in one transaction. Each put commits; in WAL mode with
``synchronous=NORMAL`` a committed write survives the process being killed (only a power loss can take
the last few transactions back).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from balancer.config import Config
from balancer.errors import ConfigError
from balancer.hookspecs import Storage, StorageFactory, hookimpl
from balancer.keyspace import hash_key
from balancer.types import Record, Version

__all__ = ["FILENAME", "SqliteStorage"]

FILENAME = "balancer.db"
"""The database file's name inside ``data_dir``."""

_SHIFT = 1 << 63  # SQLite integers are signed 64-bit; ids and versions are stored shifted into range
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key BLOB PRIMARY KEY,
    ident INTEGER NOT NULL,
    value BLOB,
    ts INTEGER NOT NULL,
    writer BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_by_ident ON records (ident);
"""


def _version(ts: int, writer: bytes) -> Version:
    return Version(ts + _SHIFT, int.from_bytes(writer))


def _row(record: Record, ident: int) -> tuple[Any, ...]:
    return (
        record.key,
        ident - _SHIFT,
        record.value,
        record.version.timestamp - _SHIFT,
        record.version.node.to_bytes(32),
    )


class SqliteStorage(Storage):
    """Records in the SQLite database at ``path`` (created if missing), ids of ``bits`` bits."""

    def __init__(self, path: str | Path, bits: int = 64) -> None:
        self.path = Path(path)
        self._bits = bits
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="balancer-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError(f"the storage at {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: func(self._connect()))

    async def get(self, key: bytes) -> Record | None:
        def get(db: sqlite3.Connection) -> Record | None:
            row = db.execute("SELECT value, ts, writer FROM records WHERE key = ?", (key,)).fetchone()
            return None if row is None else Record(key, row[0], _version(row[1], row[2]))

        return await self._run(get)

    async def put(self, record: Record) -> bool:
        ident = hash_key(record.key, bits=self._bits)

        def put(db: sqlite3.Connection) -> bool:
            with db:  # one transaction: compare, then write
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT ts, writer FROM records WHERE key = ?", (record.key,)).fetchone()
                if row is not None and _version(row[0], row[1]) >= record.version:
                    return False
                db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)", _row(record, ident))
                return True

        return await self._run(put)

    async def scan(
        self, start: int | None = None, end: int | None = None, batch: int = 256
    ) -> AsyncIterator[list[Record]]:
        conditions: list[str] = []
        args: list[Any] = []
        if start is not None and end is not None:
            # (start, end] on the circle; start >= end wraps past zero (start == end: the whole circle)
            conditions.append("ident > ? AND ident <= ?" if start < end else "ident > ? OR ident <= ?")
            args += [start - _SHIFT, end - _SHIFT]
        after: list[Any] = []
        while True:
            where = [*conditions, "(ident, key) > (?, ?)"] if after else conditions
            clause = f"WHERE {' AND '.join(f'({c})' for c in where)}" if where else ""
            sql = f"SELECT key, value, ts, writer, ident FROM records {clause} ORDER BY ident, key LIMIT ?"
            params = (*args, *after, batch)

            def fetch(db: sqlite3.Connection, sql: str = sql, params: tuple[Any, ...] = params) -> list[Any]:
                return db.execute(sql, params).fetchall()

            rows = await self._run(fetch)
            if not rows:
                return
            yield [Record(r[0], r[1], _version(r[2], r[3])) for r in rows]
            after = [rows[-1][4], rows[-1][0]]

    async def remove(self, records: list[Record]) -> int:
        def remove(db: sqlite3.Connection) -> int:
            removed = 0
            with db:
                db.execute("BEGIN IMMEDIATE")
                for record in records:
                    row = db.execute("SELECT ts, writer FROM records WHERE key = ?", (record.key,)).fetchone()
                    if row is not None and _version(row[0], row[1]) <= record.version:
                        db.execute("DELETE FROM records WHERE key = ?", (record.key,))
                        removed += 1
            return removed

        return await self._run(remove)

    async def count(self) -> int:
        return await self._run(lambda db: int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0]))

    async def close(self) -> None:
        if self._closed:
            return

        def close(db: sqlite3.Connection) -> None:
            db.close()

        if self._db is not None:
            await self._run(close)
        self._closed = True
        self._db = None
        self._executor.shutdown(wait=True)


@hookimpl(trylast=True)
def balancer_register_storages(register: Callable[[str, StorageFactory], None]) -> None:
    """Register ``sqlite``."""

    def make(config: Config) -> Storage:
        if not config.data_dir:
            raise ConfigError("the sqlite storage needs a data folder (--data-dir)")
        return SqliteStorage(Path(config.data_dir) / FILENAME, config.bits)

    register("sqlite", make)
