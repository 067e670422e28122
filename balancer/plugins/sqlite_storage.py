"""The ``sqlite`` storage: records in one SQLite database file in WAL mode, kept across restarts.

Selected with ``Config(storage="sqlite", data_dir=...)`` (the CLI's ``--data-dir``). Every call runs on one
dedicated thread that owns the connection, so the event loop never blocks on disk and writes are
serialized: a put compares versions and writes in one transaction. Each put commits; in WAL mode with
``synchronous=NORMAL`` a committed write survives the process being killed, but a power loss or an
operating-system crash can take the last transactions back. ``Config.fsync`` (``--fsync``) selects
``synchronous=FULL``: every commit is synced to disk before it returns, so it survives a power loss too.

The factory opens the database at once and raises :class:`~balancer.errors.StorageError` if the folder
or the file cannot be used, so a node refuses to start rather than failing every request.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

from balancer.config import Config
from balancer.errors import ConfigError, StorageError
from balancer.hookspecs import Storage, StorageFactory, hookimpl
from balancer.keyspace import hash_key
from balancer.types import Record, Version

__all__ = ["FILENAME", "SqliteStorage"]

log = logging.getLogger(__name__)

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
    """Records in the SQLite database at ``path`` (created if missing), ids of ``bits`` bits.

    With ``fsync`` every commit is synced to disk (``synchronous=FULL``), else only the write-ahead log is
    written (``synchronous=NORMAL``). The database is opened on first use, or at once by :meth:`open`.
    Failures on disk raise :class:`~balancer.errors.StorageError`.
    """

    def __init__(self, path: str | Path, bits: int = 64, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._bits = bits
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="balancer-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    def open(self) -> Self:
        """Open (or create) the database now and prove it takes writes; returns the storage.

        Raises :class:`~balancer.errors.StorageError` (and releases the storage) if the folder cannot be
        created or the file cannot be opened, written, or is not a SQLite database.
        """
        try:
            self._executor.submit(self._connect).result()
        except BaseException:
            self._closed = True
            self._executor.shutdown(wait=False)
            raise
        return self

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise StorageError(f"cannot use {folder} as the data folder: it is a file")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot use {folder} as the data folder: {exc.strerror or exc}") from exc
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"cannot use {self.path}: SQLite refused WAL mode (it stays {mode})")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.executescript(_SCHEMA)
            # Rewrite the header's user_version with its own value: a write that fails now on a read-only
            # file or folder, instead of on the first put a client sends.
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            db.execute(f"PRAGMA user_version={version}")
        except (sqlite3.Error, StorageError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot use {self.path} as a database: {exc}") from exc
        self._db = db
        log.info("%s: open, WAL, synchronous=%s", self.path, "FULL" if self.fsync else "NORMAL")
        return db

    async def _run(self, func: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError(f"the storage at {self.path} is closed")
        loop = asyncio.get_running_loop()

        def run() -> T:
            db = self._connect()
            try:
                return func(db)
            except sqlite3.Error as exc:  # a full disk, a file changed under us: typed, with the file named
                raise StorageError(f"{self.path}: {exc}") from exc

        return await loop.run_in_executor(self._executor, run)

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
        # opened here, not on first use: a node on an unusable folder must refuse to start
        return SqliteStorage(Path(config.data_dir) / FILENAME, config.bits, fsync=config.fsync).open()

    register("sqlite", make)
