"""The ``memory`` storage: records in a dict, gone when the process ends. The default."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from balancer.config import Config
from balancer.errors import ConfigError
from balancer.hookspecs import Storage, StorageFactory, hookimpl
from balancer.keyspace import hash_key, in_interval
from balancer.types import Record

__all__ = ["MemoryStorage"]


class MemoryStorage(Storage):
    """Records in memory, each with its key id cached for range scans."""

    def __init__(self, bits: int = 64) -> None:
        self._bits = bits
        self._size = 1 << bits
        self._records: dict[bytes, tuple[int, Record]] = {}

    async def get(self, key: bytes) -> Record | None:
        entry = self._records.get(key)
        return None if entry is None else entry[1]

    async def put(self, record: Record) -> bool:
        entry = self._records.get(record.key)
        if entry is not None:
            if entry[1].version >= record.version:
                return False
            self._records[record.key] = (entry[0], record)
        else:
            self._records[record.key] = (hash_key(record.key, bits=self._bits), record)
        return True

    async def scan(
        self, start: int | None = None, end: int | None = None, batch: int = 256
    ) -> AsyncIterator[list[Record]]:
        everything = start is None or end is None
        chosen = [
            record
            for ident, record in list(self._records.values())
            if everything or in_interval(ident, start, end, self._size, right_closed=True)  # type: ignore[arg-type]
        ]
        for i in range(0, len(chosen), batch):
            yield chosen[i : i + batch]

    async def remove(self, records: list[Record]) -> int:
        removed = 0
        for record in records:
            entry = self._records.get(record.key)
            if entry is not None and entry[1].version <= record.version:
                del self._records[record.key]
                removed += 1
        return removed

    async def count(self) -> int:
        return len(self._records)

    async def close(self) -> None:
        self._records.clear()


@hookimpl(trylast=True)
def balancer_register_storages(register: Callable[[str, StorageFactory], None]) -> None:
    """Register ``memory``."""

    def make(config: Config) -> Storage:
        if config.fsync:  # syncing to disk was asked for, and nothing here ever reaches a disk
            raise ConfigError("fsync needs a durable storage (--data-dir); the memory storage keeps nothing")
        return MemoryStorage(config.bits)

    register("memory", make)
