"""rtnetlink address messages are parsed as the kernel means them, and a dump works."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
import trio

from tunlwip import HostAddressError, hostaddrs
from tunlwip.hostaddrs import (
    IFA_ADDRESS,
    IFA_LOCAL,
    NLMSG_DONE,
    NLMSG_ERROR,
    RTM_DELADDR,
    RTM_NEWADDR,
    HostAddresses,
    dump_addresses,
    parse_messages,
)


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def message(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload
    return raw + bytes(-len(raw) % 4)


def addr_message(kind: int, family: int, index: int, *attrs: bytes) -> bytes:
    return message(kind, struct.pack("=BBBBI", family, 24, 0, 0, index) + b"".join(attrs))


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_the_local_address_is_taken_not_a_point_to_point_peer() -> None:
    """On a point-to-point link IFA_ADDRESS is the peer's: the host owns IFA_LOCAL only."""
    peer, local = (
        attr(IFA_ADDRESS, ip("198.18.9.2").packed),
        attr(IFA_LOCAL, ip("198.18.9.1").packed),
    )
    data = (
        addr_message(RTM_NEWADDR, socket.AF_INET, 3, peer, local)
        + addr_message(RTM_NEWADDR, socket.AF_INET6, 4, attr(IFA_ADDRESS, ip("fd00:9::1").packed))
        + addr_message(RTM_DELADDR, socket.AF_INET, 3, attr(IFA_LOCAL, ip("198.18.9.1").packed))
        + message(NLMSG_DONE, bytes(4))
    )
    assert list(parse_messages(data)) == [
        (RTM_NEWADDR, (3, 24, ip("198.18.9.1"))),
        (RTM_NEWADDR, (4, 24, ip("fd00:9::1"))),
        (RTM_DELADDR, (3, 24, ip("198.18.9.1"))),
        (NLMSG_DONE, None),
    ]


def test_malformed_messages_are_skipped_and_errors_raised() -> None:
    bad_attr = addr_message(RTM_NEWADDR, socket.AF_INET, 1, struct.pack("=HH", 200, IFA_LOCAL))
    short_addr = addr_message(RTM_NEWADDR, socket.AF_INET, 1, attr(IFA_LOCAL, b"\x01\x02"))
    other_family = addr_message(RTM_NEWADDR, socket.AF_PACKET, 1, attr(IFA_LOCAL, bytes(4)))
    assert [entry for _, entry in parse_messages(bad_attr + short_addr + other_family)] == [
        None, None, None]  # fmt: skip
    assert list(parse_messages(message(RTM_NEWADDR, b"\x02")[:10])) == []  # truncated header
    with pytest.raises(OSError, match="rtnetlink: EPERM") as caught:
        list(parse_messages(message(NLMSG_ERROR, struct.pack("=i", -1) + bytes(16))))
    assert caught.value.errno == 1


def test_an_address_stays_refused_until_its_last_interface_loses_it() -> None:
    seen: list[frozenset[object]] = []
    hosts = HostAddresses(seen.append)
    a = ip("198.18.9.1")
    hosts.apply([(RTM_NEWADDR, (3, 24, a)), (RTM_NEWADDR, (5, 32, a))])
    hosts.apply([(RTM_DELADDR, (3, 24, a))])
    assert hosts.addresses == {a}
    hosts.apply([(RTM_DELADDR, (5, 32, a)), (RTM_NEWADDR, None)])
    assert hosts.addresses == frozenset()


def test_a_dump_lists_this_namespaces_loopback() -> None:
    """Read-only: an RTM_GETADDR dump of the namespace the tests run in (lo is always up)."""
    assert ip("127.0.0.1") in {address for _, _, address in dump_addresses()}


async def test_run_reports_the_set_and_leaves_it_empty_on_exit() -> None:
    """Read-only, in the tests' namespace: reported before ``started()``, emptied on exit."""
    seen: list[frozenset[object]] = []
    hosts = HostAddresses(seen.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(hosts.run)
        assert ip("127.0.0.1") in seen[-1] and hosts.dumps == 1
        nursery.cancel_scope.cancel()
    assert seen[-1] == frozenset()


async def test_no_rtnetlink_at_start_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox without AF_NETLINK: the gateway must not start blind to the host's addresses."""

    def denied(groups: int = 0) -> socket.socket:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(hostaddrs, "_netlink_socket", denied)
    with pytest.raises(HostAddressError, match=r"rtnetlink.*Permission denied"):
        await HostAddresses(lambda addresses: None).run()
