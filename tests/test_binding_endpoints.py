"""Endpoints between Python and C, through the tables that keep recent ones.

Why: every datagram's two endpoints come from ``endpoint_from_c`` and every UDP send's go
through ``endpoint_to_c_shared``; both keep what they made, so a table that returned another
endpoint's entry, or grew without bound, would misdirect or leak on every packet.
"""

from __future__ import annotations

from tunlwip.binding import endpoints
from tunlwip.binding.endpoints import endpoint_from_c, endpoint_to_c, endpoint_to_c_shared
from tunlwip.endpoint import Endpoint

SAMPLES = [
    Endpoint.parse("198.18.0.2", 5353),
    Endpoint.parse("198.18.0.2", 5354),
    Endpoint.parse("198.18.0.3", 5353),
    Endpoint.parse("fd00::2", 5353),
    Endpoint.parse("::c612:2", 5353),  # an IPv6 address whose low bytes are an IPv4 one's
]


def test_endpoints_come_back_as_they_went_whatever_the_table_holds() -> None:
    for _ in range(2):  # made, then found
        for endpoint in SAMPLES:
            back = endpoint_from_c(endpoint_to_c(endpoint))
            assert back == endpoint
            assert back.address.version == endpoint.address.version
    assert endpoint_from_c(endpoint_to_c(SAMPLES[0])) is endpoint_from_c(endpoint_to_c(SAMPLES[0]))


def test_shared_c_endpoints_are_one_per_endpoint_and_hold_it() -> None:
    for endpoint in SAMPLES:
        shared = endpoint_to_c_shared(endpoint)
        assert endpoint_to_c_shared(endpoint) is shared
        assert endpoint_from_c(shared) == endpoint
    assert len({id(endpoint_to_c_shared(e)) for e in SAMPLES}) == len(SAMPLES)


def test_the_tables_are_bounded() -> None:
    for port in range(endpoints._KEPT + 10):
        endpoint = Endpoint.parse("198.18.1.1", port)
        assert endpoint_from_c(endpoint_to_c(endpoint)) == endpoint
        assert endpoint_from_c(endpoint_to_c_shared(endpoint)) == endpoint
    for host in range(endpoints._KEPT + 10):
        endpoint = Endpoint.parse(f"fd00::{host:x}", 443)
        assert endpoint_from_c(endpoint_to_c(endpoint)) == endpoint
    assert len(endpoints._from_c) <= endpoints._KEPT
    assert len(endpoints._to_c) <= endpoints._KEPT
    assert len(endpoints._addresses) <= endpoints._KEPT


def test_a_clients_connections_share_its_address() -> None:
    """A new connection differs from the last only in its port: its address is not parsed
    again (and a v4 and a v6 address with the same low bytes stay apart)."""
    first = endpoint_from_c(endpoint_to_c(Endpoint.parse("198.18.7.7", 40000)))
    second = endpoint_from_c(endpoint_to_c(Endpoint.parse("198.18.7.7", 40001)))
    assert second.port == 40001 and second.address is first.address
    v6 = endpoint_from_c(endpoint_to_c(Endpoint.parse("::c612:707", 40000)))
    assert v6.address.version == 6 and v6.address is not first.address
