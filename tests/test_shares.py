"""The per-client share table (``tunlwip.shares``): keys, automatic shares, acquire/release."""

from __future__ import annotations

import ipaddress

import pytest

from tunlwip.shares import ClientCounts, client_key, describe_key, share_of

A = ipaddress.ip_address("198.18.0.2")
B = ipaddress.ip_address("198.18.0.3")
V6_HOST = ipaddress.ip_address("fd00:18::2")
V6_SAME_64 = ipaddress.ip_address("fd00:18::ffff:1234:5678:9abc")
V6_OTHER_64 = ipaddress.ip_address("fd00:18:0:1::2")


def test_ipv4_clients_are_keyed_per_address() -> None:
    assert client_key(A) != client_key(B)
    assert describe_key(client_key(A)) == "198.18.0.2"


def test_ipv6_clients_are_keyed_per_64() -> None:
    """A host rotating through addresses of its /64 stays one client; another /64 is not."""
    assert client_key(V6_HOST) == client_key(V6_SAME_64)
    assert client_key(V6_HOST) != client_key(V6_OTHER_64)
    assert describe_key(client_key(V6_SAME_64)) == "fd00:18::/64"


def test_ipv4_and_ipv6_keys_never_collide() -> None:
    """0.0.0.1 and ::1:0:0:0:0 (the /64 whose prefix is the integer 1) are different clients."""
    v4 = ipaddress.ip_address("0.0.0.1")
    v6 = ipaddress.ip_address("0:0:0:1::")
    assert client_key(v4) != client_key(v6)
    assert describe_key(client_key(v6)) == "0:0:0:1::/64"


@pytest.mark.parametrize(("limit", "share"), [
    (1, 1), (6, 6), (16, 16), (40, 16), (64, 16), (100, 25), (1024, 256), (4096, 1024),
    (65536, 16384),
])  # fmt: skip
def test_automatic_share_is_a_quarter_with_a_floor(limit: int, share: int) -> None:
    assert share_of(limit) == share


def test_configured_share_is_kept_within_the_limit() -> None:
    assert share_of(1024, 10) == 10
    assert share_of(8, 100) == 8  # never above the global limit


def test_acquire_stops_at_the_share_per_client() -> None:
    counts = ClientCounts()
    assert all(counts.acquire(A, 3) for _ in range(3))
    assert not counts.acquire(A, 3)  # A's share is full ...
    assert counts.acquire(B, 3)  # ... B's is not
    assert counts.count(A) == 3 and counts.count(B) == 1
    assert counts.total() == 4 and len(counts) == 2 and counts.largest() == 3
    counts.release(A)
    assert counts.acquire(A, 3)  # room again after a release


def test_a_lower_share_applies_at_once() -> None:
    """Shares are given per call, so a reconfigured (lower) share refuses at once while the
    client holds more; releases still count down to zero."""
    counts = ClientCounts()
    for _ in range(5):
        assert counts.acquire(A, 5)
    assert not counts.acquire(A, 2)
    for _ in range(5):
        counts.release(A)
    assert counts.count(A) == 0 and len(counts) == 0


def test_release_returns_to_zero_and_forgets_the_client() -> None:
    counts = ClientCounts()
    for _ in range(4):
        counts.acquire(V6_HOST, 10)
    for _ in range(4):
        counts.release(V6_SAME_64)  # the same /64
    assert counts.total() == 0 and len(counts) == 0 and counts.snapshot() == {}


def test_release_of_nothing_never_goes_negative() -> None:
    counts = ClientCounts()
    counts.release(A)
    assert counts.count(A) == 0
    counts.acquire(A, 1)
    counts.release(A)
    counts.release(A)
    assert counts.count(A) == 0 and counts.acquire(A, 1)


def test_clear_and_snapshot() -> None:
    counts = ClientCounts()
    counts.acquire(A, 2)
    counts.acquire(V6_HOST, 2)
    assert counts.snapshot() == {"198.18.0.2": 1, "fd00:18::/64": 1}
    counts.clear()
    assert counts.total() == 0
