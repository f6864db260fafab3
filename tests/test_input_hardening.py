"""Crafted input that used to reach lwIP past the input hooks' checks, or to cost it without
bound: extension headers, fragment trains that change protocol, half-open floods, an MSS of 1,
one-byte segments out of order. Each case ends with the connection still carrying bytes.

The namespace versions of these cases, against ``tunlwip up`` on a real TUN, are in
tests/integration/test_hardening_netns.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import pytest
import trio

from tunlwip import LwipStack, LwipTcpStream, MemoryDevice
from tunlwip.endpoint import Endpoint
from tunlwip.stack import StackConfig

from harness import Harness
from packets import (
    ACK,
    PSH,
    RST,
    SYN,
    fragment,
    tcp_options,
    tcp_packet,
    udp_packet,
    with_ipv4_protocol,
    with_ipv6_extension,
)
from tcppeer import PacketWire, TcpPeer

C4, D4, C6, D6 = "198.18.0.2", "192.0.2.1", "fd00:18::2", "2001:db8::1"
HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS = 0, 43, 60


def drops(h: Harness) -> dict[str, int]:
    return h.stack.statistics().dropped


def counters(h: Harness) -> Mapping[str, int]:
    return h.stack.statistics().counters


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def still_carries_bytes(peer: TcpPeer, stream: LwipTcpStream) -> None:
    await peer.send(b"still fine")
    assert await stream.receive_some() == b"still fine"
    await stream.send_all(b"and back")
    assert await peer.recv_exactly(8) == b"and back"


@pytest.mark.parametrize("kind", [HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS])
async def test_a_segment_behind_an_extension_header_never_reaches_tcp(
    harness: Harness, kind: int
) -> None:
    """The abort of issue 19: behind a Destination Options header, a segment half the sequence
    space away used to go through lwIP's own ip6_input to tcp_input, past every check, and
    abort the gateway ("insane offset!"). Dropped at the hook now, and counted."""
    peer = TcpPeer(harness.wire, C6, 43000, D6, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    far = tcp_packet(C6, D6, 43000, 80, seq=peer.seq + 2**31, ack=peer.ack, flags=ACK | PSH,
                     payload=b"x")  # fmt: skip
    harness.device.inject_packet(with_ipv6_extension(far, kind))
    await settle()
    assert drops(harness) == {"ip6_extension": 1}
    assert counters(harness)["drop_unchecked"] == 0
    await still_carries_bytes(peer, stream)


@pytest.mark.parametrize("checksum", [None, 0x1234])
async def test_udp_to_multicast_behind_an_extension_header_is_dropped(
    udp_harness: Harness, checksum: int | None
) -> None:
    """Port 0, a bad checksum and a multicast destination: behind an extension header all of
    it used to reach the UDP handler."""
    harness = udp_harness
    seen = harness.udp_received
    for dst in ("ff02::1", "ff01::1"):
        datagram = udp_packet(C6, dst, 4000, 0, b"x", checksum=checksum)
        harness.device.inject_packet(with_ipv6_extension(datagram, DESTINATION_OPTIONS))
    await settle()
    assert drops(harness) == {"ip6_extension": 2} and seen == []


def far_segment_fragments(src: str, dst: str, peer: TcpPeer) -> list[bytes]:
    """The 1-byte segment half the sequence space away, in fragments of 8 bytes."""
    far = tcp_packet(src, dst, peer.sport, peer.dport, seq=peer.seq + 2**31, ack=peer.ack,
                     flags=ACK | PSH, payload=b"x")  # fmt: skip
    pieces = fragment(far, (20 if src == C4 else 48) + 8)
    assert len(pieces) == 3
    return pieces


@pytest.mark.parametrize(("proto", "reason"), [(99, "unsupported"), (17, "fragment_protocol")])
async def test_an_ipv4_fragment_train_cannot_change_protocol(
    harness: Harness, autojump_clock: trio.abc.Clock, proto: int, reason: str
) -> None:
    """ip4_reass matches fragments on addresses and ID only: a first fragment of TCP (through
    the hook) and a last one of protocol 99 (through ip4_input) used to reassemble into a TCP
    segment that skipped every check. Every fragment is the hook's now, and one naming another
    protocol than its datagram's first fragment is dropped."""
    peer = TcpPeer(harness.wire, C4, 43001, D4, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    first, middle, last = far_segment_fragments(C4, D4, peer)
    harness.device.inject_packet(first)
    harness.device.inject_packet(middle)
    harness.device.inject_packet(with_ipv4_protocol(last, proto))
    await settle()
    assert drops(harness)[reason] == 1 and set(drops(harness)) <= {reason, "fragment"}
    assert counters(harness)["datagrams_reassembled"] == 0
    await still_carries_bytes(peer, stream)


async def test_an_ipv6_fragment_train_cannot_change_protocol(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    peer = TcpPeer(harness.wire, C6, 43002, D6, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    first, middle, last = far_segment_fragments(C6, D6, peer)
    udp_last = last[:40] + bytes([17]) + last[41:]  # the fragment header's next header
    for piece in (first, middle, udp_last):
        harness.device.inject_packet(piece)
    await settle()
    assert drops(harness)["fragment_protocol"] == 1
    await still_carries_bytes(peer, stream)


@pytest.mark.parametrize(("src", "dst"), [(C4, D4), (C6, D6)])
async def test_a_fragment_of_an_extension_header_is_dropped(
    harness: Harness, src: str, dst: str
) -> None:
    """IPv6 fragments of anything but TCP, UDP or ICMPv6 (here: Destination Options) would be
    reassembled by ip6_input and walked to tcp_input; IPv4 fragments of other protocols
    likewise by ip4_input."""
    inner = tcp_packet(src, dst, 43003, 80, seq=1, flags=ACK, payload=b"y" * 40)
    if src == C6:
        packet = with_ipv6_extension(inner, DESTINATION_OPTIONS)
        reason = "ip6_extension"
    else:
        packet = with_ipv4_protocol(inner, 99)
        reason = "unsupported"
    for piece in fragment(packet, 64):
        harness.device.inject_packet(piece)
    await settle()
    assert set(drops(harness)) == {reason}
    assert counters(harness)["drop_unchecked"] == 0


@pytest.fixture
async def small_stack(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    """A stack that admits at most 8 half-open connections."""
    device = MemoryDevice()
    stack = LwipStack(device, StackConfig(max_half_open=8, forward_local_destinations=True))
    wire = PacketWire(device)
    h = Harness(stack, device, wire)
    done = trio.Event()

    async def handler(stream: LwipTcpStream, target: Endpoint) -> None:
        await h.accepted_send.send((stream, target))
        await done.wait()

    nursery.start_soon(wire.run)
    await nursery.start(stack.run, handler)
    yield h
    done.set()


async def test_half_open_connections_are_bounded_oldest_first(
    small_stack: Harness, autojump_clock: trio.abc.Clock
) -> None:
    """50 SYNs nobody completes: at most 8 stay in SYN_RCVD, the 42 oldest are reset as newer
    ones arrive, and a real client still connects. lwIP lets them go after 20 s."""
    h = small_stack
    for i in range(50):
        h.device.inject_packet(tcp_packet(C4, D4, 50000 + i, 80, seq=i, flags=SYN,
                                          options=tcp_options(mss=1460)))  # fmt: skip
    await settle()
    assert counters(h)["tcp_half_open"] == 8
    assert counters(h)["tcp_half_open_evicted"] == 42
    resets = {p.dport for p in h.wire.unmatched_nowait() if p.flags & RST}
    assert resets == {50000 + i for i in range(42)}  # the oldest, in order of arrival
    peer = TcpPeer(h.wire, C4, 43004, D4, 80, isn=5000)
    await peer.connect()
    stream = await h.next_stream()
    assert counters(h)["tcp_half_open"] == 7  # one more evicted for it, then it completed
    await still_carries_bytes(peer, stream)
    await trio.sleep(30)
    assert counters(h)["tcp_half_open"] == 0


async def test_a_client_mss_of_one_is_raised_to_536(harness: Harness) -> None:
    """lwIP takes any non-zero MSS: with 1, every byte sent to the client was a segment."""
    peer = TcpPeer(harness.wire, C4, 43005, D4, 80, mss=1, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    await stream.send_all(b"z" * 3000)
    assert await peer.recv_exactly(3000) == b"z" * 3000
    sizes = [len(seg.payload) for seg in peer.segments if seg.payload]
    assert max(sizes) == 536 and len(sizes) <= 6, sizes


async def test_one_byte_segments_out_of_order_stay_bounded(harness: Harness) -> None:
    """5,000 one-byte segments out of order, each a pbuf on lwIP's out-of-order queue (walked
    on every insert), then 2,000 duplicates of the last: lwIP keeps at most 256 of them, and
    the data, sent in order afterwards, arrives exactly."""
    peer = TcpPeer(harness.wire, C4, 43006, D4, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    data = bytes(i * 7 % 251 for i in range(10_002))
    base = peer.seq
    for i in range(5000):
        offset = 1 + 2 * i
        harness.device.inject_packet(tcp_packet(C4, D4, 43006, 80, seq=base + offset,
                                                ack=peer.ack, flags=ACK,
                                                payload=data[offset : offset + 1]))  # fmt: skip
    last = tcp_packet(C4, D4, 43006, 80, seq=base + 9999, ack=peer.ack, flags=ACK,
                      payload=data[9999:10000])  # fmt: skip
    for _ in range(2000):
        harness.device.inject_packet(last)
    await settle()
    harness.wire.unmatched_nowait()  # the duplicate ACKs lwIP sent meanwhile
    await peer.send(data)
    got = b""
    while len(got) < len(data):
        got += await stream.receive_some()
    assert got == data


async def test_a_second_syn_cannot_lower_the_mss(harness: Harness) -> None:
    """lwIP parses every segment's options in SYN_RCVD: a SYN|ACK carrying MSS 1 after a SYN
    with MSS 1460 used to set the connection's MSS to 1 past the floor (found in review)."""
    syn = tcp_packet(C4, D4, 43007, 80, seq=1000, flags=SYN, options=tcp_options(mss=1460))
    harness.device.inject_packet(syn)
    synack = await harness.wire.next_unmatched()
    assert synack.flags & SYN and synack.flags & ACK
    harness.device.inject_packet(tcp_packet(C4, D4, 43007, 80, seq=1000, ack=synack.seq + 1,
                                            flags=SYN | ACK,
                                            options=tcp_options(mss=1)))  # fmt: skip
    stream = await harness.next_stream()
    with trio.fail_after(10):  # with MSS 1, lwIP's queue fills after ~2,000 bytes: stuck
        await stream.send_all(b"q" * 3000)
    await settle()
    sizes = [len(p.payload) for p in harness.wire.unmatched_nowait() if p.payload]
    assert sizes and min(sizes) > 1 and max(sizes) == 1460, sizes
