"""The DNS queries being resolved, by client: what the proxy's admission counts.

Why a module of its own: every query a client sends is looked up here once when it comes and
once when it is answered, and the keys are chosen for that: an ``Endpoint`` hashes its
``ip_address`` through ``hex()`` in Python, so a query is keyed by numbers (the client's
address as ``names.address_key`` gives it, its port, the message ID). A client's
retransmission of a query still in flight is a duplicate; beyond ``limit`` queries, or the
client's ``share`` of them (``shares.ClientCounts``: IPv4 per address, IPv6 per /64), a query
is refused. What the proxy answers then, and what it counts, is the proxy's business.
"""

from __future__ import annotations

from enum import Enum

from ..endpoint import Endpoint
from ..shares import ClientCounts
from .names import address_key


class Refusal(Enum):
    """Why a query was not admitted."""

    DUPLICATE = "a query with this client and ID is in flight"
    OVERLOAD = "the limit of queries in flight is reached"
    CLIENT_SHARE = "the client holds its share of the limit"


class InFlightQueries:
    """The queries in flight: admitted by ``admit``, each released once by ``release``."""

    __slots__ = ("_keys", "per_client")

    def __init__(self) -> None:
        self._keys: set[tuple[int, int, int]] = set()
        #: Queries in flight by client (``shares``), next to the keys.
        self.per_client = ClientCounts()

    def __len__(self) -> int:
        return len(self._keys)

    def admit(self, query: bytes, client: Endpoint, limit: int, share: int) -> Refusal | None:
        """Count ``query`` (at least its 2-byte ID) from ``client`` in flight, or say why not."""
        keys = self._keys
        held = len(keys)
        key = _key(query, client)
        keys.add(key)  # (new if the set grew: one look-up rather than two)
        if len(keys) == held:
            return Refusal.DUPLICATE
        if held >= limit:
            keys.discard(key)
            return Refusal.OVERLOAD
        if not self.per_client.acquire(client.address, share):
            keys.discard(key)
            return Refusal.CLIENT_SHARE
        return None

    def release(self, query: bytes, client: Endpoint) -> None:
        """``query`` is answered or given up; harmless if it was not admitted."""
        keys = self._keys
        held = len(keys)
        keys.discard(_key(query, client))
        if len(keys) != held:
            self.per_client.release(client.address)


def _key(query: bytes, client: Endpoint) -> tuple[int, int, int]:
    return (address_key(client.address), client.port, int.from_bytes(query[:2], "big"))
