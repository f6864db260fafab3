"""Bad input never crashes the stack, never makes it emit an invalid packet, and is counted."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunlwip import LwipStack, MemoryDevice, StackConfig
from tunlwip.endpoint import IPAddress
from tunlwip.stack import StackHooks

from harness import Harness
from packets import (
    ACK,
    FIN,
    PROTO_TCP,
    PSH,
    RST,
    SYN,
    fragment,
    icmp_echo,
    parse,
    tcp_options,
    tcp_packet,
    udp_packet,
)
from tcppeer import TcpPeer

C4, D4, C6, D6 = "198.18.0.2", "192.0.2.1", "fd00:18::2", "2001:db8::1"


def drops(h: Harness) -> dict[str, int]:
    return h.stack.statistics().dropped


async def settle(h: Harness) -> None:
    await trio.testing.wait_all_tasks_blocked()


def with_byte(packet: bytes, index: int, value: int) -> bytes:
    return packet[:index] + bytes([value]) + packet[index + 1 :]


SYN4 = tcp_packet(C4, D4, 40000, 80, seq=1, flags=SYN, options=tcp_options(mss=1460))
SYN6 = tcp_packet(C6, D6, 40000, 80, seq=1, flags=SYN, options=tcp_options(mss=1440))
UDP4 = udp_packet(C4, D4, 4000, 53, b"hello")
UDP6 = udp_packet(C6, D6, 4000, 53, b"hello")
SYN_OPTION_AT_END4 = tcp_packet(C4, D4, 40000, 80, seq=1, flags=SYN, options=b"\x01\x01\x01\x08")
SYN_OPTION_AT_END6 = tcp_packet(
    C6, D6, 40000, 80, seq=1, flags=SYN, options=bytes([2, 4, 5, 180, 1, 1, 1, 30])
)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "too_short"),
        (b"\x45" + b"\0" * 10, "too_short"),
        (b"\x60" + b"\0" * 20, "too_short"),
        (b"\x75" + b"\0" * 40, "bad_version"),
        (SYN4[:30], "ip_header"),  # total length says more than we have
        (with_byte(SYN4, 0, 0x44), "ip_header"),  # IHL 16 bytes
        (with_byte(SYN4, 2, 0xFF), "ip_header"),  # total length lies (too long)
        (with_byte(SYN4, 10, SYN4[10] ^ 0xFF), "ip_checksum"),
        (with_byte(SYN4, 25, SYN4[25] ^ 0x01), "transport_checksum"),
        (tcp_packet(C4, D4, 40000, 0, seq=1, flags=SYN), "port_zero"),
        (udp_packet(C4, D4, 0, 53, b"x"), "port_zero"),
        (tcp_packet(C4, "255.255.255.255", 1, 80, seq=1, flags=SYN), "bad_address"),
        (udp_packet(C4, "224.0.0.251", 5353, 5353, b"mdns"), "bad_address"),
        (udp_packet("0.0.0.0", D4, 68, 67, b"dhcp"), "bad_address"),
        (udp_packet(C6, "ff02::fb", 5353, 5353, b"mdns"), "bad_address"),
        (tcp_packet(C4, D4, 1, 80, seq=1, flags=SYN)[: 20 + 12], "ip_header"),
        (with_byte(UDP4, 25, 200), "transport_header"),  # UDP length longer than datagram
        (with_byte(UDP6, 45, 200), "transport_header"),
        (with_byte(SYN6, 5, 0xFF), "ip_header"),  # IPv6 payload length lies
        (with_byte(UDP6, 47, UDP6[47] ^ 0x10), "transport_checksum"),
        (with_byte(SYN4, 32, 0x20), "transport_header"),  # TCP data offset 8 bytes
        # an option kind in the header's last byte: lwIP would read its length past the packet
        (SYN_OPTION_AT_END4, "transport_header"),
        (SYN_OPTION_AT_END6, "transport_header"),
    ],
)
async def test_each_kind_of_bad_packet_is_dropped_and_counted(
    harness: Harness, packet: bytes, reason: str
) -> None:
    harness.device.inject_packet(packet)
    await settle(harness)
    assert drops(harness) == {reason: 1}
    assert harness.wire.unmatched_nowait() == []


#: (packet, what the client gets back): a reset (TCP), ICMP port unreachable (UDP: type 3/1
#: code 3/4), ICMP host or address unreachable (echo: type 3/1 code 1/3).
LOCAL_DESTINATIONS = [
    (tcp_packet(C4, "127.0.0.1", 40000, 22, seq=1, flags=SYN), "rst"),
    (udp_packet(C4, "127.0.0.53", 4000, 53, b"local resolver"), (3, 3)),
    (udp_packet(C4, "169.254.169.254", 4000, 80, b"cloud metadata"), (3, 3)),
    (tcp_packet(C4, "0.1.2.3", 40000, 80, seq=1, flags=SYN), "rst"),
    (tcp_packet(C6, "::1", 40000, 22, seq=1, flags=SYN), "rst"),
    (udp_packet(C6, "fe80::1", 4000, 9000, b"link-local"), (1, 4)),
    (icmp_echo(C4, "127.0.0.1", 7, 1, b"ping"), (3, 1)),
]


def check_refusal(packet: bytes, expected: str | tuple[int, int], reply: bytes) -> None:
    """``reply`` is what a closed or unreachable destination answers ``packet`` with."""
    asked, got = parse(packet), parse(reply)
    assert got.l4_checksum_ok and got.dst == asked.src, got.summary()
    if expected == "rst":
        back = (PROTO_TCP, asked.dst, asked.dport, asked.sport)
        assert (got.proto, got.src, got.sport, got.dport) == back, got.summary()
        assert got.flags & RST and got.ack == asked.seq + 1, got.summary()  # the SYN counts 1
    else:
        assert (got.icmp_type, got.icmp_code) == expected, got.summary()
        assert packet[: len(packet) - 8] in reply or packet[:28] in reply  # quotes the packet


@pytest.mark.parametrize(("packet", "expected"), LOCAL_DESTINATIONS)
async def test_the_gateway_hosts_local_networks_are_never_forwarded(
    packet: bytes, expected: str | tuple[int, int]
) -> None:
    """A client must not reach the gateway host's loopback services (or a cloud metadata
    address) through the gateway: refused and counted before any handler sees it, with the
    answer of a closed or unreachable destination so the client fails at once."""
    device = MemoryDevice()
    seen: list[object] = []
    stack = LwipStack(
        device, hooks=StackHooks(udp_receiver=lambda src, dst, data: seen.append(dst))
    )

    async def handler(stream: object, target: object) -> None:
        seen.append(target)

    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, handler)
        stack.inject_packet(packet)
        await trio.testing.wait_all_tasks_blocked()
        assert stack.statistics().dropped == {"local_destination": 1}
        assert seen == []
        [reply] = device.emitted_nowait()
        check_refusal(packet, expected, reply)
        nursery.cancel_scope.cancel()


HOST4, HOST6 = "192.0.2.77", "2001:db8::77"
HOST_DESTINATIONS = [
    (tcp_packet(C4, HOST4, 40000, 22, seq=1000, flags=SYN), "rst"),
    (tcp_packet(C6, HOST6, 40000, 22, seq=1000, flags=SYN), "rst"),
    (udp_packet(C4, HOST4, 4000, 5353, b"to the host"), (3, 3)),
    (udp_packet(C6, HOST6, 4000, 5353, b"to the host"), (1, 4)),
    (icmp_echo(C4, HOST4, 7, 1, b"ping"), (3, 1)),
    (icmp_echo(C6, HOST6, 7, 1, b"ping"), (1, 3)),
]


@pytest.mark.parametrize(("packet", "expected"), HOST_DESTINATIONS)
async def test_the_gateway_hosts_own_addresses_are_refused(
    packet: bytes, expected: str | tuple[int, int]
) -> None:
    """Addresses given to set_host_addresses are refused as loopback is (same counter, same
    answers); a bad checksum or a fragment is only dropped; an address taken off is forwarded
    again, and forward_local_destinations forwards them all."""
    device = MemoryDevice()
    seen: list[object] = []
    hooks = StackHooks(udp_receiver=lambda src, dst, data: seen.append(dst),
                       icmp_echo_receiver=lambda src, dst, message: seen.append(dst))  # fmt: skip
    stack = LwipStack(device, hooks=hooks)

    async def handler(stream: object, target: object) -> None:
        seen.append(target)

    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, handler)
        try:
            hosts = map(ipaddress.ip_address, [HOST4, HOST6, "10.1.1.1"])
            assert stack.set_host_addresses(hosts) == 3
            stack.inject_packet(packet)
            await trio.testing.wait_all_tasks_blocked()
            assert stack.statistics().dropped == {"local_destination": 1} and seen == []
            [reply] = device.emitted_nowait()
            check_refusal(packet, expected, reply)
            stack.inject_packet(with_byte(packet, len(packet) - 1, packet[-1] ^ 0xFF))
            for piece in fragment(udp_packet(C4, HOST4, 4000, 9, bytes(1000)), 576):
                stack.inject_packet(piece)  # 2 fragments: dropped, not answered
            await trio.testing.wait_all_tasks_blocked()
            assert stack.statistics().dropped == {"local_destination": 4}
            assert device.emitted_nowait() == []  # a corrupted packet gets no answer
            stack.set_host_addresses([ipaddress.ip_address("10.1.1.1")])
            stack.inject_packet(packet)
            await trio.testing.wait_all_tasks_blocked()
            assert stack.statistics().dropped == {"local_destination": 4}  # forwarded now
            answers = [parse(reply) for reply in device.emitted_nowait()]
            # UDP handed on; TCP answered with SYN-ACK, echo with a reply (icmp.echo "reply")
            assert seen or [a for a in answers if a.flags & SYN or a.icmp_type in (0, 129)]
        finally:
            stack.set_host_addresses([])
        nursery.cancel_scope.cancel()


async def test_host_addresses_leave_the_stacks_own_addresses_to_the_dns_proxy() -> None:
    """The stack's own addresses (the DNS proxy's) are never refused, even if the host reports
    them too; forward_local_destinations lifts the refusal entirely."""
    device = MemoryDevice()
    got: list[object] = []
    hooks = StackHooks(udp_receiver=lambda src, dst, data: got.append(dst))
    stack = LwipStack(device, StackConfig(forward_local_destinations=True), hooks=hooks)

    async def handler(stream: object, target: object) -> None:
        got.append(target)

    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, handler)
        own: list[IPAddress] = [stack.config.ipv4_address, stack.config.ipv6_address]
        try:
            assert stack.set_host_addresses([*own, ipaddress.ip_address(HOST4)]) == 1
            stack.inject_packet(udp_packet(C4, str(own[0]), 4000, 53, b"query"))
            stack.inject_packet(udp_packet(C4, HOST4, 4000, 53, b"query"))
            await trio.testing.wait_all_tasks_blocked()
            assert stack.statistics().dropped == {} and len(got) == 2
        finally:
            stack.set_host_addresses([])
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("src", "dst"), [(C4, D4), (C6, D6)])
@pytest.mark.parametrize("flags", [ACK | FIN, ACK | PSH])
async def test_segment_half_the_sequence_space_away_is_dropped(
    harness: Harness, src: str, dst: str, flags: int
) -> None:
    """lwIP 2.1.3 aborts (assertion "insane offset!") on a 1-byte segment 2^31 from rcv_nxt:
    any client could stop the gateway with it (found by fuzz/packet_fuzzer.c)."""
    peer = TcpPeer(harness.wire, src, 43000, dst, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    payload = b"" if flags & FIN else b"x"
    far = tcp_packet(src, dst, 43000, 80, seq=peer.seq + 2**31, ack=peer.ack, flags=flags,
                     payload=payload)  # fmt: skip
    harness.device.inject_packet(far)
    await settle(harness)
    assert drops(harness) == {"transport_header": 1}
    await peer.send(b"still fine")
    assert await stream.receive_some() == b"still fine"


async def test_mss_option_after_the_handshake_is_ignored(harness: Harness) -> None:
    """lwIP 2.1.3 takes an MSS option from any segment; a smaller one with data queued made
    the next write abort ("inconsistent oversize vs. space", found by fuzz/packet_fuzzer.c)."""
    peer = TcpPeer(harness.wire, C4, 44000, D4, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    peer.detach()  # raw segments from here on: the client's window closes, then reopens
    seq, ack = peer.seq, peer.ack

    def segment(seq: int, window: int, payload: bytes = b"", options: bytes = b"") -> None:
        harness.device.inject_packet(tcp_packet(C4, D4, 44000, 80, seq=seq, ack=ack, flags=ACK,
                                                window=window, payload=payload,
                                                options=options))  # fmt: skip

    segment(seq, 65535, b"abc")
    segment(seq + 3, 0)  # a newer segment, so lwIP takes the zero window
    assert await stream.receive_some() == b"abc"
    await stream.send_all(b"x" * 50)  # stays queued; the next write leaves room to grow
    await stream.send_all(b"x" * 50)
    segment(seq + 3, 0, options=tcp_options(mss=536))
    await settle(harness)
    await stream.send_all(b"y" * 100)  # lwIP 2.1.3 aborted here
    segment(seq + 3, 65535)
    await settle(harness)
    sent = b"".join(p.payload for p in harness.wire.unmatched_nowait())
    assert sent == b"x" * 100 + b"y" * 100


def only_reassembly_timeouts(h: Harness) -> bool:
    """Abandoning a datagram whose first fragment arrived sends ICMP "fragment reassembly time
    exceeded" (RFC 792 / RFC 8200 4.5), as a host would; nothing else may come out."""
    return all((p.icmp_type, p.icmp_code) in ((11, 1), (3, 1)) for p in h.wire.unmatched_nowait())


@pytest.mark.parametrize(("src", "dst"), [(C4, D4), (C6, D6)])
async def test_overlapping_fragments_are_dropped_and_counted(
    udp_harness: Harness, autojump_clock: trio.abc.Clock, src: str, dst: str
) -> None:
    harness = udp_harness
    datagram = udp_packet(src, dst, 4000, 9000, bytes(range(256)) * 12)
    coarse, fine = fragment(datagram, 1500), fragment(datagram, 1000)
    harness.device.inject_packet(coarse[0])  # bytes 0..1480 (IPv6: 0..1448)
    harness.device.inject_packet(fine[1])  # starts inside the first fragment
    await settle(harness)
    assert harness.stack.statistics().counters["drop_fragment"] >= 1
    await trio.sleep(70)  # the incomplete datagram times out of the reassembly queue
    for frag in coarse:  # the whole datagram, sent cleanly, still gets through
        harness.device.inject_packet(frag)
    await settle(harness)
    assert [data for _, _, data in harness.udp_received] == [datagram[28 if src == C4 else 48 :]]
    assert only_reassembly_timeouts(harness)


@pytest.mark.parametrize(("src", "dst_prefix"), [(C4, "198.19.{}.{}"), (C6, "fd00:99::{}:{}")])
async def test_a_flood_of_incomplete_datagrams_keeps_reassembly_bounded(
    udp_harness: Harness, autojump_clock: trio.abc.Clock, src: str, dst_prefix: str
) -> None:
    harness = udp_harness
    for i in range(3000):  # first fragments only: each opens a reassembly that never completes
        dst = dst_prefix.format(i // 256, i % 256)
        harness.stack.inject_packet(
            fragment(udp_packet(src, dst, 4000, 9000, bytes(3000)), 1500)[0]
        )
    await settle(harness)
    counters = harness.stack.statistics().counters
    assert counters["fragments_in"] == 3000 and counters["datagrams_reassembled"] == 0
    payload = bytes(range(200)) * 20
    for frag in fragment(udp_packet(src, dst_prefix.format(99, 99), 4000, 9000, payload), 1500):
        harness.device.inject_packet(frag)
    await settle(harness)
    assert [d for _, _, d in harness.udp_received] == [
        payload
    ]  # the queue evicted old partial datagrams instead of refusing
    assert only_reassembly_timeouts(harness)


def _mutations(rng: random.Random, seeds: list[bytes], count: int) -> list[bytes]:
    out: list[bytes] = []
    for i in range(count):
        kind = i % 6
        base = bytearray(rng.choice(seeds))
        if kind == 0:  # random bytes with a plausible first nibble
            n = rng.randrange(0, 200)
            data = bytearray(rng.randbytes(n))
            if data:
                data[0] = rng.choice([0x45, 0x46, 0x60, 0x4F, 0x00])
            out.append(bytes(data))
        elif kind == 1:  # bit flips
            for _ in range(rng.randrange(1, 4)):
                j = rng.randrange(len(base))
                base[j] ^= 1 << rng.randrange(8)
            out.append(bytes(base))
        elif kind == 2:  # truncation
            out.append(bytes(base[: rng.randrange(len(base))]))
        elif kind == 3:  # lying length fields
            if base[0] >> 4 == 4:
                struct.pack_into("!H", base, 2, rng.randrange(65536))
            else:
                struct.pack_into("!H", base, 4, rng.randrange(65536))
            out.append(bytes(base))
        elif kind == 4:  # trailing garbage
            out.append(bytes(base) + rng.randbytes(rng.randrange(1, 64)))
        else:  # random fragment pieces
            frags = fragment(bytes(base) + rng.randbytes(2000), 576)
            out.append(rng.choice(frags))
    return out


async def test_ten_thousand_random_and_mutated_packets(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    rng = random.Random(20261123)
    seeds = [
        SYN4, SYN6, UDP4, UDP6,
        tcp_packet(C4, D4, 40000, 80, seq=2, ack=1, flags=ACK | PSH, payload=b"data" * 50),
        tcp_packet(C6, D6, 40000, 80, seq=2, ack=1, flags=ACK, payload=b"x" * 100),
        udp_packet(C6, D6, 1234, 443, bytes(300)),
        udp_packet(C4, D4, 1234, 443, bytes(30)),
        icmp_echo(C4, D4, 7, 1, bytes(56)),
        icmp_echo(C6, D6, 7, 1, bytes(56)),
        icmp_echo(C4, D4, 7, 2, bytes(3000)),
        icmp_echo(C6, D6, 7, 2, bytes(3000)),
    ]  # fmt: skip
    corpus = _mutations(rng, seeds, 10_000)
    before = harness.stack.statistics().counters
    for i, packet in enumerate(corpus):
        harness.stack.inject_packet(packet)
        if i % 500 == 0:
            await settle(harness)
    await trio.sleep(70)  # let reassembly buffers and half-open connections time out
    after = harness.stack.statistics().counters
    dropped = sum(after[k] - before[k] for k in after if k.startswith("drop_"))
    assert after["packets_in"] - before["packets_in"] == len(corpus)
    assert dropped > 5000, after
    assert not harness.wire.invalid


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=120), max_size=20))
def test_arbitrary_bytes_never_crash(packets: list[bytes]) -> None:
    async def main() -> None:
        device = MemoryDevice()
        stack = LwipStack(device)

        async def handler(stream: object, target: object) -> None:
            pass

        async with trio.open_nursery() as nursery:
            await nursery.start(stack.run, handler)
            for p in packets:
                stack.inject_packet(p)
            stats = stack.statistics().counters
            assert stats["packets_in"] == len(packets)
            nursery.cancel_scope.cancel()

    trio.run(main)
