"""The DNS proxy's queries in flight: duplicates, the limit, a client's share, release.

Why: keys are numbers (not ``Endpoint``s) for speed, so what they must still tell apart is
pinned here: clients, ports, IDs, and an IPv4 client from the IPv6 one of the same number.
"""

from __future__ import annotations

from tunlwip.dns.in_flight import InFlightQueries, Refusal
from tunlwip.endpoint import Endpoint

A = Endpoint.parse("198.18.0.2", 5353)
A_OTHER_PORT = Endpoint.parse("198.18.0.2", 5354)
B = Endpoint.parse("198.18.0.3", 5353)
A_AS_V6 = Endpoint.parse("::c612:2", 5353)  # the number of 198.18.0.2, as IPv6


def query(message_id: int) -> bytes:
    return message_id.to_bytes(2, "big") + bytes(10)


def test_duplicates_are_by_client_port_and_id() -> None:
    queries = InFlightQueries()
    assert queries.admit(query(1), A, 10, 10) is None
    assert queries.admit(query(1), A, 10, 10) is Refusal.DUPLICATE
    for other in (A_OTHER_PORT, B, A_AS_V6):
        assert queries.admit(query(1), other, 10, 10) is None
    assert queries.admit(query(2), A, 10, 10) is None
    assert len(queries) == 5
    assert queries.per_client.count(A.address) == 3  # per address, whatever the port


def test_the_limit_and_the_share_refuse_and_count_nothing() -> None:
    queries = InFlightQueries()
    assert queries.admit(query(1), A, 3, 2) is None
    assert queries.admit(query(2), A, 3, 2) is None
    assert queries.admit(query(3), A, 3, 2) is Refusal.CLIENT_SHARE
    assert queries.admit(query(1), B, 3, 2) is None
    assert queries.admit(query(2), B, 3, 2) is Refusal.OVERLOAD
    assert len(queries) == 3
    assert queries.per_client.snapshot() == {"198.18.0.2": 2, "198.18.0.3": 1}
    # A refused query was not kept: it is not a duplicate once there is room.
    queries.release(query(1), A)
    assert queries.admit(query(2), B, 3, 2) is None


def test_release_is_once_and_harmless_for_what_was_not_admitted() -> None:
    queries = InFlightQueries()
    assert queries.admit(query(7), A, 10, 10) is None
    queries.release(query(7), A_AS_V6)  # not this one
    queries.release(query(7), B)
    assert len(queries) == 1 and queries.per_client.count(A.address) == 1
    queries.release(query(7), A)
    queries.release(query(7), A)
    assert len(queries) == 0 and queries.per_client.total() == 0
