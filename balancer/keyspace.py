"""The identifier space: stable m-bit ids for keys and addresses, and circular intervals.

Ids come from BLAKE2b, which is in the standard library, fast, and takes a salt: ``hash_key(key, salt)``
for different salts are independent hash functions, which is what random jumps (bounded loads) and
multi-ring replica placement need. The hash is stable across processes and machines (unlike ``hash()``).

This module imports nothing from the rest of balancer.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b

__all__ = ["DEFAULT_BITS", "Key", "KeySpace", "hash_key", "in_interval", "to_bytes"]

DEFAULT_BITS = 64
_MAX_BITS = 512  # BLAKE2b digests are at most 64 bytes

Key = str | bytes
"""What balancer accepts as a key: text (hashed as UTF-8) or bytes."""


def to_bytes(key: Key) -> bytes:
    """Return the bytes a key is hashed as: UTF-8 for text, the bytes themselves otherwise."""
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise TypeError(f"keys are str or bytes, not {type(key).__name__}")


def _salt(salt: int) -> bytes:
    if not 0 <= salt < 1 << 128:
        raise ValueError(f"salt must be in [0, 2**128), got {salt}")
    return salt.to_bytes(16, "little")


def hash_key(key: Key, salt: int = 0, bits: int = DEFAULT_BITS) -> int:
    """Hash ``key`` to an integer in ``[0, 2**bits)``; each ``salt`` gives an independent function.

    ``salt=0`` is the plain hash. Raises ``TypeError`` for keys that are neither str nor bytes.
    """
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be in [1, {_MAX_BITS}], got {bits}")
    size = (bits + 7) // 8
    digest = blake2b(to_bytes(key), digest_size=size, salt=_salt(salt)).digest()
    return int.from_bytes(digest, "big") >> (size * 8 - bits)


def in_interval(
    x: int,
    a: int,
    b: int,
    size: int,
    *,
    left_closed: bool = False,
    right_closed: bool = False,
) -> bool:
    """Whether ``x`` lies on the circular interval from ``a`` clockwise to ``b`` on a ring of ``size``.

    Ends are open unless ``left_closed``/``right_closed``. When ``a == b`` the interval is the whole
    circle, less the point ``a`` if both ends are open: so ``(n, n)`` is every id but ``n``, and
    ``(n, n]`` is every id, which is what a lone Chord node needs.
    """
    if x == a and left_closed:
        return True
    if x == b and right_closed:
        return True
    if x in (a, b):
        return False
    return (x - a) % size < ((b - a) % size or size)


@dataclass(frozen=True, slots=True)
class KeySpace:
    """An m-bit circular identifier space (m = ``bits``, 64 by default)."""

    bits: int = DEFAULT_BITS

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= _MAX_BITS:
            raise ValueError(f"bits must be in [1, {_MAX_BITS}], got {self.bits}")

    @property
    def size(self) -> int:
        """The number of ids, ``2**bits``."""
        return 1 << self.bits

    def id(self, key: Key, salt: int = 0) -> int:
        """The id of ``key`` (salted as in :func:`hash_key`)."""
        return hash_key(key, salt, self.bits)

    def distance(self, a: int, b: int) -> int:
        """Clockwise distance from ``a`` to ``b``, in ``[0, size)``."""
        return (b - a) % self.size

    def finger_start(self, n: int, i: int) -> int:
        """Start of finger ``i`` (0-based) of node ``n``: ``(n + 2**i) mod 2**bits``."""
        if not 0 <= i < self.bits:
            raise ValueError(f"finger index must be in [0, {self.bits}), got {i}")
        return (n + (1 << i)) % self.size

    def contains(
        self, x: int, a: int, b: int, *, left_closed: bool = False, right_closed: bool = False
    ) -> bool:
        """:func:`in_interval` on this space."""
        return in_interval(x, a, b, self.size, left_closed=left_closed, right_closed=right_closed)
