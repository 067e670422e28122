"""A client of a ring from outside it: one node's HTTP API (``/kv``, ``/status``, ``/ring``), no join.

:class:`RemoteNode` offers the key-value operations of a :class:`~balancer.hookspecs.RingMember`, so the
REPL runs on it unchanged (``balancer cli HOST:PORT``), and the one-shot commands (``balancer get``,
``put``, ``delete``) use it too. Errors come back as the same typed errors a member raises: a missing
key is :class:`~balancer.errors.KeyNotFoundError`, a failed quorum :class:`~balancer.errors.QuorumError`
(with how many replicas stored a write), an unreachable node :class:`~balancer.errors.PeerUnreachableError`.
What only a member has (its own records, its routing state, leaving the ring) raises
:class:`~balancer.errors.NotMemberError`.

::

    async with RemoteNode("127.0.0.1:9001", token="s3cret") as ring:
        await ring.put("city", b"Porto Alegre")
        print(await ring.get("city"))
"""

from __future__ import annotations

import ssl
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from balancer import errors
from balancer.errors import BadAnswerError, NotMemberError, PeerUnreachableError, QuorumError
from balancer.keyspace import KeySpace
from balancer.types import Member, Payload, Record, RingView

__all__ = ["RemoteNode"]


class RemoteNode:
    """A ring reached through one node's HTTP API, without joining it; an async context manager.

    :param address: the node's ``host:port``.
    :param token: the API token, if the ring has one (``Authorization: Bearer``).
    :param ca: a CA file (PEM) to verify the node's certificate with: the API is then called over TLS.
    :param timeout: seconds one request may take.
    """

    member = False
    """Not a ring member: nothing is stored here, and closing hands nothing off."""

    def __init__(
        self, address: str, *, token: str | None = None, ca: str | None = None, timeout: float = 10.0
    ):
        self.address = address
        self.space = KeySpace()
        """The ring's identifier space (its id size is read from the node when the client opens)."""
        self.stopped = False
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
        self._base = f"{'https' if ca else 'http'}://{address}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.settings: dict[str, Any] = {}
        """The ring's settings as the node reports them (``replicas``, ``write_quorum``, ...)."""

    async def open(self) -> Self:
        """Open the connection pool and read the node's status (raises if it does not answer)."""
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            status = await self.status()
        except BaseException:
            await self.aclose()
            raise
        settings = status.get("settings")
        self.settings = settings if isinstance(settings, dict) else {}
        bits = self.settings.get("bits")
        if isinstance(bits, int) and 8 <= bits <= 160:
            self.space = KeySpace(bits)
        return self

    async def aclose(self) -> None:
        """Close the connection pool."""
        self.stopped = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the key-value API ------------------------------------------------------------------------

    async def get(self, key: str | bytes) -> bytes:
        """The value of ``key``; raises :class:`~balancer.errors.KeyNotFoundError`."""
        return await self._request("GET", self._kv(key))

    async def put(self, key: str | bytes, value: bytes) -> None:
        """Store ``value`` under ``key``; :class:`~balancer.errors.QuorumError` if W replicas did not."""
        await self._request("PUT", self._kv(key), value)

    async def delete(self, key: str | bytes) -> None:
        """Delete ``key``; raises :class:`~balancer.errors.KeyNotFoundError` if it has no live value."""
        await self._request("DELETE", self._kv(key))

    async def status(self) -> Payload:
        """The node's view (``GET /status``)."""
        return _object(await self._request("GET", URL(f"{self._base}/status")))

    async def ring_view(self) -> Payload:
        """Every member of the ring (``GET /ring``)."""
        return _object(await self._request("GET", URL(f"{self._base}/ring")))

    # -- what only a member has -------------------------------------------------------------------

    async def local_records(self) -> list[Record]:
        """Raises :class:`NotMemberError`: a client stores nothing."""
        raise NotMemberError("a client stores no records; run dump in a member's REPL (balancer repl)")

    def view(self) -> RingView:
        """Raises :class:`NotMemberError`: a client has no routing state."""
        raise NotMemberError("a client has no neighbours; `ring` lists the ring's members")

    def members(self) -> tuple[Member, ...]:
        """No members are known without asking (see :meth:`ring_view`)."""
        return ()

    async def leave(self) -> None:
        """A client has no ring to leave: this only closes it."""
        await self.aclose()

    # -- internals --------------------------------------------------------------------------------

    def _kv(self, key: str | bytes) -> URL:
        raw = key if isinstance(key, bytes) else key.encode()
        if not raw:
            raise errors.BadRequestError("the key is empty")
        return URL(f"{self._base}/kv/{quote(raw, safe='')}", encoded=True)

    async def _request(self, method: str, url: URL, body: bytes | None = None) -> bytes:
        if self._session is None:
            raise errors.BalancerError("the client is closed: open it first (async with RemoteNode(...))")
        try:
            async with self._session.request(method, url, data=body, ssl=self._ssl) as response:
                data = await response.read()
                status = response.status
        except TimeoutError as exc:
            raise PeerUnreachableError(self.address, "did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:  # nothing listens, or no route to it
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            reason = "connection refused" if refused else exc.os_error.strerror or str(exc.os_error)
            raise PeerUnreachableError(self.address, f"cannot connect: {reason}", refused=True) from exc
        except aiohttp.ClientError as exc:
            raise PeerUnreachableError(self.address, str(exc) or type(exc).__name__) from exc
        if status == 200:
            return data
        raise _failure(status, data)


def _object(body: bytes) -> Payload:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadAnswerError(200, f"is not JSON ({len(body)} bytes)") from None
    if not isinstance(data, dict):
        raise BadAnswerError(200, f"is a JSON {type(data).__name__}, not an object")
    return data


def _failure(status: int, body: bytes) -> errors.BalancerError:
    """The typed error a node's error answer stands for."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return BadAnswerError(status, "is not a balancer error")
    kind, message = str(error.get("type")), str(error.get("message"))
    answered, needed = error.get("answered"), error.get("needed")
    if kind in ("QuorumError", "CutOffError") and isinstance(answered, int) and isinstance(needed, int):
        failed = QuorumError(str(error.get("operation") or "request"), answered, needed)
        failed.args = (message,)
        return failed
    return errors.rebuild(kind, message, status)
