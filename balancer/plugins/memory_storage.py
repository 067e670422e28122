"""The ``memory`` storage: records packed into bytes in RAM, gone when the process ends. The default.

**Layout.** A Python object per key costs far more than the key and value themselves (a ``Record``, a
``Version``, two ints and a tuple per key made 10**6 records of 16-byte keys and 100-byte values cost
about 400 MB). So records are kept packed: each record is one *entry* of bytes (a small header with the
version and a tombstone flag, the key, the value), and the entries of keys whose ids share a prefix are
concatenated into one immutable ``bytes`` *group*. A store of 10**6 such records holds about 60,000
groups of 16 records each; :class:`~balancer.types.Record` objects are built only when read.

**Groups.** A group holds the keys whose ids (``hash_key(key, bits=bits)``) begin with one prefix, so a
range scan takes the groups inside the range whole and checks ids only in the two at its ends, and no id
is stored per key. Groups split by linear hashing: when the store averages more than :data:`GROUP_SIZE`
records per group, the next group in line splits in two by the following bit of its keys' ids. One split
touches one group, so a store grows without ever rehashing everything at once (no pause of the event
loop), and groups only ever split, never merge, which is what lets a scan walk them while writes go on.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Iterator
from hashlib import blake2b

from balancer.config import Config
from balancer.errors import ConfigError
from balancer.hookspecs import Storage, StorageFactory, hookimpl
from balancer.types import Record, Version

__all__ = ["GROUP_SIZE", "MemoryStorage"]

GROUP_SIZE = 16
"""Records per group, on average, before groups split: a read walks about half a group's entries, and
each group costs about 100 bytes of bookkeeping, so 16 keeps both small."""

# An entry: its whole length, the key's length, flags, the version's timestamp and writer; then the key;
# then, for a version that does not fit 64-bit fields, the lengths and bytes of both; then the value.
_HEAD = struct.Struct(">IIBQQ")
_PEEK = struct.Struct(">II")  # the first two fields: an entry's length and its key's
_LENGTH = struct.Struct(">I")
_WIDE = struct.Struct(">BB")  # lengths of a wide timestamp and writer, after the key
_TOMBSTONE = 1
_WIDE_VERSION = 2
_U64 = 1 << 64


def _entry(record: Record) -> bytes:
    """``record`` packed as one entry."""
    key, value, version = record.key, record.value, record.version
    flags = _TOMBSTONE if value is None else 0
    body = b"" if value is None else value
    timestamp, writer = version.timestamp, version.node
    if timestamp < _U64 and writer < _U64:
        size = _HEAD.size + len(key) + len(body)
        return _HEAD.pack(size, len(key), flags, timestamp, writer) + key + body
    wide_ts = timestamp.to_bytes((timestamp.bit_length() + 7) // 8 or 1, "big")
    wide_writer = writer.to_bytes((writer.bit_length() + 7) // 8 or 1, "big")
    extra = _WIDE.pack(len(wide_ts), len(wide_writer)) + wide_ts + wide_writer
    size = _HEAD.size + len(key) + len(extra) + len(body)
    return _HEAD.pack(size, len(key), flags | _WIDE_VERSION, 0, 0) + key + extra + body


def _version_at(blob: bytes, pos: int) -> tuple[Version, int, bool]:
    """The version of the entry at ``pos``, where its value starts, and whether it is a tombstone."""
    _, klen, flags, timestamp, writer = _HEAD.unpack_from(blob, pos)
    at = pos + _HEAD.size + klen
    if flags & _WIDE_VERSION:
        ts_len, writer_len = _WIDE.unpack_from(blob, at)
        at += _WIDE.size
        timestamp = int.from_bytes(blob[at : at + ts_len], "big")
        writer = int.from_bytes(blob[at + ts_len : at + ts_len + writer_len], "big")
        at += ts_len + writer_len
    return Version(timestamp, writer), at, bool(flags & _TOMBSTONE)


def _record_at(blob: bytes, pos: int, size: int, klen: int) -> Record:
    """The entry at ``pos`` (of ``size`` bytes, key of ``klen``) as a :class:`Record`."""
    version, at, tombstone = _version_at(blob, pos)
    key = blob[pos + _HEAD.size : pos + _HEAD.size + klen]
    return Record(key, None if tombstone else blob[at : pos + size], version)


def _entries(blob: bytes) -> Iterator[tuple[int, int, int]]:
    """Each entry of a group: where it starts, its length, its key's length."""
    pos, end = 0, len(blob)
    while pos < end:
        size, klen = _PEEK.unpack_from(blob, pos)
        yield pos, size, klen
        pos += size


def _find(blob: bytes, key: bytes) -> tuple[int, int]:
    """Where ``key``'s entry starts in a group and its length, or ``(-1, 0)``.

    ``bytes.find`` looks for the key's bytes at C speed, so a missing key (every new key a put adds)
    costs no walk at all; a hit is confirmed by walking the entries' lengths up to it, since the same
    bytes may also occur inside another entry's value.
    """
    head = _HEAD.size
    hit = blob.find(key, head)
    pos = 0
    while hit >= 0:
        while pos + head < hit:
            pos += _LENGTH.unpack_from(blob, pos)[0]
        if pos + head == hit:
            size, klen = _PEEK.unpack_from(blob, pos)
            if klen == len(key):
                return pos, size
            hit = blob.find(key, hit + 1)  # ``key`` began this entry's longer key
        else:  # inside an entry: the next key begins at pos + head at the earliest
            hit = blob.find(key, pos + head)
    return -1, 0


class MemoryStorage(Storage):
    """Records in memory, packed into groups by key-id prefix (see the module doc); ids of ``bits`` bits."""

    def __init__(self, bits: int = 64) -> None:
        self._bits = bits
        self._size = 1 << bits
        self._digest_size = (bits + 7) // 8
        self._drop = self._digest_size * 8 - bits
        # Group ``(1 << depth) | prefix`` holds the keys whose ids begin with ``prefix`` (``depth`` bits):
        # groups before the split pointer are at depth level + 1, the rest at depth level.
        self._groups: dict[int, bytes] = {}
        self._level = 0
        self._next = 0  # the split pointer: the prefix (at depth level) of the next group to split
        self._count = 0

    def _id(self, key: bytes) -> int:
        # hash_key(key, bits=...) without its argument checks: this runs once per read and write
        digest = blake2b(key, digest_size=self._digest_size).digest()
        return int.from_bytes(digest, "big") >> self._drop

    def _group(self, ident: int) -> int:
        """The group that holds id ``ident``."""
        shift = self._bits - self._level
        prefix = ident >> shift
        if prefix < self._next:
            return (2 << self._level) | (ident >> (shift - 1))
        return (1 << self._level) | prefix

    def _span(self, group: int) -> tuple[int, int]:
        """The first and last id a group holds."""
        depth = group.bit_length() - 1
        width = self._bits - depth
        low = (group ^ (1 << depth)) << width
        return low, low + (1 << width) - 1

    async def get(self, key: bytes) -> Record | None:
        blob = self._groups.get(self._group(self._id(key)))
        if blob is None:
            return None
        pos, size = _find(blob, key)
        return None if pos < 0 else _record_at(blob, pos, size, len(key))

    async def put(self, record: Record) -> bool:
        group = self._group(self._id(record.key))
        blob = self._groups.get(group, b"")
        pos, size = _find(blob, record.key)
        if pos >= 0:
            if _version_at(blob, pos)[0] >= record.version:
                return False
            self._groups[group] = blob[:pos] + _entry(record) + blob[pos + size :]
            return True
        self._groups[group] = blob + _entry(record)
        self._count += 1
        self._grow()
        return True

    def _grow(self) -> None:
        """Split groups, one at a time, while the store averages more than GROUP_SIZE per group."""
        while self._level < self._bits and self._count > GROUP_SIZE * ((1 << self._level) + self._next):
            depth, prefix = self._level, self._next
            halves: list[list[bytes]] = [[], []]
            bit = self._bits - depth - 1
            blob = self._groups.pop((1 << depth) | prefix, b"")
            for pos, size, klen in _entries(blob):
                key = blob[pos + _HEAD.size : pos + _HEAD.size + klen]
                halves[(self._id(key) >> bit) & 1].append(blob[pos : pos + size])
            for half, parts in enumerate(halves):
                if parts:
                    self._groups[(2 << depth) | (prefix << 1) | half] = b"".join(parts)
            self._next += 1
            if self._next == 1 << depth:
                self._level, self._next = depth + 1, 0

    async def scan(
        self, start: int | None = None, end: int | None = None, batch: int = 256
    ) -> AsyncIterator[list[Record]]:
        last = self._size - 1
        if start is None or end is None or start == end:
            ranges = [(0, last)]
        elif start < end:
            ranges = [(start + 1, end)]
        else:  # wraps past zero
            ranges = [(start + 1, last), (0, end)] if start < last else [(0, end)]
        chosen: list[Record] = []
        for low, high in ranges:
            cursor = low
            while cursor <= high:
                # Looked up afresh at each step: a write between two batches may have split the group
                # ahead, and splits only cut groups finer, so ``cursor`` is still where one begins.
                group = self._group(cursor)
                first, final = self._span(group)
                blob = self._groups.get(group)
                if blob is not None:
                    inside = low <= first and final <= high  # else check each key's id
                    chosen += self._records(blob, None if inside else (low, high))
                if len(chosen) >= batch:
                    for i in range(0, len(chosen) - batch + 1, batch):
                        yield chosen[i : i + batch]
                    chosen = chosen[len(chosen) - len(chosen) % batch :]
                cursor = final + 1
        if chosen:
            yield chosen

    def _records(self, blob: bytes, bounds: tuple[int, int] | None) -> list[Record]:
        """A group's records, only those whose ids lie within ``bounds`` (inclusive) if given."""
        records: list[Record] = []
        pos, end, head = 0, len(blob), _HEAD.size
        while pos < end:
            size, klen, flags, timestamp, writer = _HEAD.unpack_from(blob, pos)
            key = blob[pos + head : pos + head + klen]
            if bounds is None or bounds[0] <= self._id(key) <= bounds[1]:
                if flags:
                    records.append(_record_at(blob, pos, size, klen))
                else:  # the common case, unpacked once
                    value = blob[pos + head + klen : pos + size]
                    records.append(Record(key, value, Version(timestamp, writer)))
            pos += size
        return records

    async def remove(self, records: list[Record]) -> int:
        removed = 0
        for record in records:
            group = self._group(self._id(record.key))
            blob = self._groups.get(group)
            if blob is None:
                continue
            pos, size = _find(blob, record.key)
            if pos < 0 or _version_at(blob, pos)[0] > record.version:
                continue
            rest = blob[:pos] + blob[pos + size :]
            if rest:
                self._groups[group] = rest
            else:
                del self._groups[group]
            self._count -= 1
            removed += 1
        return removed

    async def count(self) -> int:
        return self._count

    async def close(self) -> None:
        self._groups.clear()
        self._level = self._next = self._count = 0


@hookimpl(trylast=True)
def balancer_register_storages(register: Callable[[str, StorageFactory], None]) -> None:
    """Register ``memory``."""

    def make(config: Config) -> Storage:
        if config.fsync:  # syncing to disk was asked for, and nothing here ever reaches a disk
            raise ConfigError("fsync needs a durable storage (--data-dir); the memory storage keeps nothing")
        return MemoryStorage(config.bits)

    register("memory", make)
