"""Fair shares: how much of one limit a single client may hold.

Why: every budget of the gateway (held SYNs, connections, UDP sessions, DNS queries in flight)
is global, so one client that fills it denies every other client. Each budget therefore also
has a per-client share, counted here: the owner of a budget asks ``acquire`` before it opens
something for a client and calls ``release`` once that thing is gone, on every path.

A client is its IPv4 address, or the /64 network of its IPv6 address: a single IPv6 host
usually owns a whole /64 (SLAAC, privacy addresses) and could otherwise rotate through fresh
addresses to get a fresh share each time.

The table is pure bookkeeping (no I/O, no clock) and only holds clients with something open,
so its size is bounded by the global limit it shares out. A table may have a ``mirror``, told of
every change as (client key, +n or -n): how C's admission (``_csrc/admit.c``) sees Python's
counts without asking Python.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from .endpoint import IPAddress

__all__ = ["SHARE_FLOOR", "SHARE_FRACTION", "ClientCounts", "CountMirror", "client_key",
           "describe_key", "share_of"]  # fmt: skip

#: A client's key: its IPv4 address as an int (< 2**32), or its IPv6 /64 prefix as an int
#: with bit 64 set (>= 2**64), so the two families never collide.
ClientKey = int

#: The automatic share: a quarter of the global limit, so one client leaves three quarters
#: to the others, ...
SHARE_FRACTION = 4
#: ... but never fewer than this (nor more than the limit): a small global limit is not cut
#: into shares too small for one ordinary client (a browser opens dozens of connections).
SHARE_FLOOR = 16

_V6_TAG = 1 << 64

#: Told of each change of a table's counts: (client key, change).
CountMirror = Callable[[ClientKey, int], None]


def client_key(address: IPAddress) -> ClientKey:
    """The key ``address`` is counted under: IPv4 per address, IPv6 per /64."""
    if address.version == 4:
        return int(address)
    return _V6_TAG | (int(address) >> 64)


def describe_key(key: ClientKey) -> str:
    """The client a key stands for, as logs show it ("198.18.0.2", "fd00:18::/64")."""
    if key < _V6_TAG:
        return str(ipaddress.IPv4Address(key))
    return str(ipaddress.IPv6Network(((key ^ _V6_TAG) << 64, 64)))


def share_of(limit: int, configured: int | None = None) -> int:
    """One client's share of ``limit``: ``configured`` if set, else the automatic share,
    ``max(min(SHARE_FLOOR, limit), limit // SHARE_FRACTION)``. Never above ``limit``."""
    if configured is not None:
        return max(1, min(configured, limit))
    return max(min(SHARE_FLOOR, limit), limit // SHARE_FRACTION, 1)


class ClientCounts:
    """How many of one budget's things each client holds."""

    __slots__ = ("_counts", "_mirror")

    def __init__(self, mirror: CountMirror | None = None) -> None:
        self._counts: dict[ClientKey, int] = {}
        self._mirror = mirror

    def __len__(self) -> int:
        """Clients holding at least one."""
        return len(self._counts)

    def count(self, address: IPAddress) -> int:
        """What the client of ``address`` holds now."""
        return self._counts.get(client_key(address), 0)

    def total(self) -> int:
        """What all clients hold together."""
        return sum(self._counts.values())

    def largest(self) -> int:
        """What the busiest client holds (0 for none)."""
        return max(self._counts.values(), default=0)

    def acquire(self, address: IPAddress, share: int) -> bool:
        """Count one more for ``address``'s client if it holds fewer than ``share``; False
        (nothing counted) if its share is full."""
        key = client_key(address)
        held = self._counts.get(key, 0)
        if held >= share:
            return False
        self._counts[key] = held + 1
        if self._mirror is not None:
            self._mirror(key, 1)
        return True

    def add(self, address: IPAddress) -> None:
        """Count one more for ``address``'s client, share or not (its owner checked it)."""
        key = client_key(address)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._mirror is not None:
            self._mirror(key, 1)

    def release(self, address: IPAddress) -> None:
        """One of ``address``'s client's things is gone. Releasing what was never acquired
        is ignored (the count never goes below zero)."""
        key = client_key(address)
        held = self._counts.get(key, 0)
        if held > 1:
            self._counts[key] = held - 1
        elif held == 1:
            del self._counts[key]
        else:
            return
        if self._mirror is not None:
            self._mirror(key, -1)

    def clear(self) -> None:
        """Forget every count (the owner dropped everything at once, e.g. on stop)."""
        if self._mirror is not None:
            for key, held in self._counts.items():
                self._mirror(key, -held)
        self._counts.clear()

    def snapshot(self) -> dict[str, int]:
        """Counts by client (``describe_key``), for debugging and tests."""
        return {describe_key(key): held for key, held in self._counts.items()}
