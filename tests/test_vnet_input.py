"""Offloaded input through the virtio-net header (``_csrc/vnet_input.c``), played over a
SOCK_SEQPACKET pair that keeps packet boundaries like a TUN fd: TCP super-segments taken
whole, partial checksums completed or vouched for, UDP super-datagrams split, and every header
that does not describe its packet exactly dropped and counted (``drop_vnet_header``)."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio

from tunlwip import Endpoint, TunDevice
from tunlwip.hooks import StackHooks
from tunlwip.stack import LwipStack, StackConfig
from tunlwip.tcp import LwipTcpStream

from packets import (
    ACK,
    PSH,
    SYN,
    internet_checksum,
    is_valid,
    parse,
    problems,
    tcp_options,
    tcp_packet,
    udp_packet,
)

NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
CLIENT4 = ("198.18.0.2", "198.18.9.9", 40000, 80)
CLIENT6 = ("fd00::2", "fd00::9:9", 40000, 80)


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0) -> bytes:  # fmt: skip
    return struct.pack("=BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def partial(packet: bytes, offset: int) -> bytes:
    """``packet`` as a sender's kernel leaves it for NEEDS_CSUM: the transport checksum field
    holds the pseudo-header's sum (not complemented) instead of the checksum."""
    start = 20 if packet[0] >> 4 == 4 else 40
    at = start + offset
    zeroed = packet[:at] + b"\0\0" + packet[at + 2 :]
    if packet[0] >> 4 == 4:
        pseudo = packet[12:20] + struct.pack("!BBH", 0, packet[9], len(packet) - start)
    else:
        pseudo = packet[8:40] + struct.pack("!I3xB", len(packet) - start, packet[6])
    return zeroed[:at] + struct.pack("!H", ~internet_checksum(pseudo) & 0xFFFF) + zeroed[at + 2 :]


class Client:
    """A TCP client played over the pair: handshake, then segments with any header."""

    def __init__(self, theirs: socket.socket, stack: LwipStack, ends: tuple[str, str, int, int]):
        self.theirs, self.stack, self.ends = theirs, stack, ends
        self.seq, self.ack = 1, 0

    async def handshake(self) -> None:
        syn = tcp_packet(*self.ends, seq=self.seq, flags=SYN,
                         options=tcp_options(mss=1460, wscale=7))  # fmt: skip
        self.theirs.send(vnet() + syn)
        while True:
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(self.theirs)
            got = parse(self.theirs.recv(70000)[10:])
            if got.flags & SYN:
                break
        self.seq, self.ack = self.seq + 1, got.seq + 1
        self.theirs.send(vnet() + tcp_packet(*self.ends, seq=self.seq, ack=self.ack, flags=ACK))

    def segment(self, payload: bytes) -> bytes:
        packet = tcp_packet(*self.ends, seq=self.seq, ack=self.ack, flags=ACK | PSH,
                            payload=payload, window=4096)  # fmt: skip
        self.seq += len(payload)
        return packet

    def counters(self) -> dict[str, int]:
        return dict(self.stack.statistics().counters)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[socket.socket, TunDevice]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    device = TunDevice.from_fd(ours.detach(), name="pair", vnet_header=True)
    with theirs:
        theirs.setblocking(False)
        yield theirs, device
    await device.aclose()


async def wait_for(check: object, what: str) -> None:
    with trio.fail_after(10):
        while not check():  # type: ignore[operator]  # noqa: ASYNC110 (C counters: no event)
            await trio.sleep(0.01)


@pytest.mark.parametrize("ends", [CLIENT4, CLIENT6], ids=["ipv4", "ipv6"])
async def test_a_tcp_super_segment_is_taken_whole(
    pair: tuple[socket.socket, TunDevice], ends: tuple[str, str, int, int]
) -> None:
    """A 60,000-byte TSO super-segment with its checksum left partial reaches the stream
    whole and in order, behind a plain segment and ahead of one checksummed in place."""
    theirs, device = pair
    received = bytearray()
    stack = LwipStack(device, StackConfig())

    async def reader(stream: LwipTcpStream, target: object) -> None:
        while chunk := await stream.receive_some():
            received.extend(chunk)

    v6 = ":" in ends[0]
    hlen = 40 if v6 else 20
    first, big, last = b"a" * 100, bytes(range(256)) * 234 + b"z" * 96, b"b" * 1000
    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, reader)
        client = Client(theirs, stack, ends)
        await client.handshake()
        theirs.send(vnet() + client.segment(first))
        gso = GSO_TCPV6 if v6 else GSO_TCPV4
        theirs.send(vnet(NEEDS_CSUM, gso, hlen + 20, 1460, hlen, 16) +
                    partial(client.segment(big), 16))  # fmt: skip
        theirs.send(vnet(NEEDS_CSUM, 0, 0, 0, hlen, 16) + partial(client.segment(last), 16))
        await wait_for(lambda: len(received) >= len(first + big + last), "all bytes")
        assert bytes(received) == first + big + last
        counters = client.counters()
        assert counters["input_gso_tcp"] == 1
        assert counters["drop_vnet_header"] == counters["drop_transport_checksum"] == 0
        nursery.cancel_scope.cancel()


async def test_a_checksum_nobody_vouched_for_is_still_verified(
    pair: tuple[socket.socket, TunDevice],
) -> None:
    """Only NEEDS_CSUM or DATA_VALID skip verification: a plain header over a partial checksum
    is a bad checksum; DATA_VALID over a good one goes in."""
    theirs, device = pair
    received = bytearray()
    stack = LwipStack(device, StackConfig())

    async def reader(stream: LwipTcpStream, target: object) -> None:
        while chunk := await stream.receive_some():
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, reader)
        client = Client(theirs, stack, CLIENT4)
        await client.handshake()
        theirs.send(vnet() + partial(client.segment(b"x" * 500), 16))
        client.seq -= 500
        await wait_for(lambda: client.counters()["drop_transport_checksum"] == 1, "the drop")
        theirs.send(vnet(DATA_VALID) + client.segment(b"y" * 500))
        await wait_for(lambda: len(received) == 500, "the good segment")
        assert bytes(received) == b"y" * 500
        nursery.cancel_scope.cancel()


async def test_a_udp_super_datagram_is_split_into_its_datagrams(
    pair: tuple[socket.socket, TunDevice],
) -> None:
    """GSO_UDP_L4 (a sender's UDP_SEGMENT): each gso_size bytes is a datagram of its own,
    the last one shorter, on both families."""
    theirs, device = pair
    got: list[tuple[str, bytes]] = []
    hooks = StackHooks(udp_receiver=lambda src, dst, data: got.append((str(src), bytes(data))))
    stack = LwipStack(device, StackConfig(), hooks=hooks)
    payload = b"".join(bytes([i]) * 1200 for i in range(10)) + b"tail"
    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, None)
        for src, dst, hlen in (("198.18.0.2", "198.18.9.9", 20), ("fd00::2", "fd00::9:9", 40)):
            datagram = partial(udp_packet(src, dst, 5000, 6000, payload), 6)
            theirs.send(vnet(NEEDS_CSUM, GSO_UDP_L4, hlen + 8, 1200, hlen, 6) + datagram)
        await wait_for(lambda: len(got) == 22, "22 datagrams")
        for family in range(2):
            datagrams = [data for src, data in got[family * 11 : family * 11 + 11]]
            assert datagrams == [bytes([i]) * 1200 for i in range(10)] + [b"tail"]
        counters = dict(stack.statistics().counters)
        assert counters["input_gso_udp"] == 2 and counters["input_gso_udp_datagrams"] == 22
        nursery.cancel_scope.cancel()


def _hostile() -> list[tuple[str, bytes]]:
    """(why, what is read) for headers that do not describe their packet."""
    src, dst, sp, dp = CLIENT4
    tcp = partial(tcp_packet(src, dst, sp, dp, seq=5, ack=1, payload=b"q" * 3000), 16)
    tcp6 = partial(tcp_packet("fd00::2", "fd00::9:9", sp, dp, seq=5, payload=b"q" * 3000), 16)
    syn = partial(tcp_packet(src, dst, sp, dp, seq=5, flags=SYN, payload=b"q" * 3000), 16)
    bare = partial(tcp_packet(src, dst, sp, dp, seq=5), 16)
    udp = partial(udp_packet(src, dst, 5000, 6000, b"u" * 3000), 6)
    frag = bytearray(udp)
    frag[6] = 0x20  # more fragments
    frag[10:12] = b"\0\0"
    frag[10:12] = struct.pack("!H", internet_checksum(bytes(frag[:20])))
    return [
        ("shorter than a header", b"\1\1\0"),
        ("unknown flag bit", vnet(4) + tcp),
        ("unknown gso_type", vnet(NEEDS_CSUM, 2, 40, 1000, 20, 16) + tcp),
        ("UFO, never negotiated", vnet(NEEDS_CSUM, GSO_UDP, 28, 1000, 20, 6) + udp),
        ("TCPV6 on an IPv4 packet", vnet(NEEDS_CSUM, GSO_TCPV6, 40, 1000, 20, 16) + tcp),
        ("TCPV4 on an IPv6 packet", vnet(NEEDS_CSUM, GSO_TCPV4, 60, 1000, 40, 16) + tcp6),
        ("TCPV4 on UDP", vnet(NEEDS_CSUM, GSO_TCPV4, 28, 1000, 20, 6) + udp),
        ("UDP_L4 on TCP", vnet(NEEDS_CSUM, GSO_UDP_L4, 40, 1000, 20, 16) + tcp),
        ("ECN on UDP", vnet(NEEDS_CSUM, GSO_UDP_L4 | GSO_ECN, 28, 1000, 20, 6) + udp),
        ("ECN without GSO", vnet(NEEDS_CSUM, GSO_ECN, 0, 0, 20, 16) + tcp),
        ("GSO without NEEDS_CSUM", vnet(0, GSO_TCPV4, 40, 1000) + tcp),
        ("gso_size 0", vnet(NEEDS_CSUM, GSO_TCPV4, 40, 0, 20, 16) + tcp),
        ("hdr_len past the packet", vnet(NEEDS_CSUM, GSO_TCPV4, 4000, 1000, 20, 16) + tcp),
        ("csum_start not the TCP header", vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 24, 16) + tcp),
        ("csum_offset not TCP's", vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 6) + tcp),
        ("csum_offset not UDP's", vnet(NEEDS_CSUM, 0, 0, 0, 20, 16) + udp),
        ("csum_start past the packet", vnet(NEEDS_CSUM, 0, 0, 0, 65000, 6) + udp),
        ("NEEDS_CSUM on a fragment", vnet(NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(frag)),
        ("IP length shorter than read", vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + tcp + b"!"),
        ("a GSO SYN", vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + syn),
        ("a GSO segment without data", vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + bare),
        ("3,000 one-byte datagrams", vnet(NEEDS_CSUM, GSO_UDP_L4, 28, 1, 20, 6) + udp),
        ("UDP length not the payload's",
         vnet(NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6) + udp[:24] + b"\0\x09" + udp[26:]),
    ]  # fmt: skip


async def test_hostile_virtio_net_headers_are_dropped_and_counted(
    pair: tuple[socket.socket, TunDevice],
) -> None:
    """Each header that does not describe its packet exactly is one counted drop; nothing of
    it reaches lwIP, and a good packet after all of them still goes in."""
    theirs, device = pair
    got: list[bytes] = []
    hooks = StackHooks(udp_receiver=lambda src, dst, data: got.append(bytes(data)))
    stack = LwipStack(device, StackConfig(), hooks=hooks)
    cases = _hostile()
    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, None)
        for why, data in cases:
            before = dict(stack.statistics().counters)
            theirs.send(data)
            seen = before["packets_in"]
            await wait_for(lambda s=seen: stack.statistics().counters["packets_in"] > s, why)
            after = dict(stack.statistics().counters)
            assert after["drop_vnet_header"] == before["drop_vnet_header"] + 1, why
            assert (after["tcp_in"], after["udp_in"]) == (before["tcp_in"], before["udp_in"]), why
        src, dst, *_ = CLIENT4
        theirs.send(vnet(NEEDS_CSUM, 0, 0, 0, 20, 6) +
                    partial(udp_packet(src, dst, 5000, 6000, b"fine"), 6))  # fmt: skip
        await wait_for(lambda: got, "the good datagram")
        assert got == [b"fine"]
        nursery.cancel_scope.cancel()


async def test_python_reads_complete_checksums_and_split_super_datagrams(
    pair: tuple[socket.socket, TunDevice],
) -> None:
    """``receive_packet`` (the slow path, for embedders reading packets themselves) hands out
    whole, checksummed packets: a TSO super-segment as one, a USO super-datagram as its
    datagrams, a header it cannot make sense of as nothing."""
    theirs, device = pair
    src, dst, sp, dp = CLIENT4
    big = tcp_packet(src, dst, sp, dp, seq=1, payload=b"t" * 5000)
    theirs.send(vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1460, 20, 16) + partial(big, 16))
    theirs.send(vnet(NEEDS_CSUM, GSO_TCPV4, 40, 1460, 20, 99) + partial(big, 16))  # nonsense
    for src6, dst6 in (("198.18.0.2", "198.18.9.9"), ("fd00::2", "fd00::9:9")):
        hlen = 40 if ":" in src6 else 20
        datagram = partial(udp_packet(src6, dst6, 5000, 6000, b"u" * 2500), 6)
        theirs.send(vnet(NEEDS_CSUM, GSO_UDP_L4, hlen + 8, 1000, hlen, 6) + datagram)
    with trio.fail_after(10):
        packets = [await device.receive_packet() for _ in range(7)]
    assert packets[0] == big  # its checksum completed: the packet as if never offloaded
    assert [len(parse(p).payload) for p in packets[1:]] == [1000, 1000, 500] * 2
    assert all(is_valid(p) for p in packets), [problems(p) for p in packets]


async def test_a_burst_of_same_size_datagrams_leaves_in_one_uso_write(
    pair: tuple[socket.socket, TunDevice],
) -> None:
    """Output the other way (vnet.c): inside a burst, a flow's same-size datagrams leave as
    one GSO_UDP_L4 write whose checksum is left partial, ended by a shorter one; another flow
    starts a write of its own; a lone datagram keeps lwIP's checksum."""
    theirs, device = pair
    stack = LwipStack(device, StackConfig())
    client, target = Endpoint.parse("198.18.0.2", 5000), Endpoint.parse("198.18.9.9", 53)
    other = Endpoint.parse("198.18.9.9", 54)
    async with trio.open_nursery() as nursery:
        await nursery.start(stack.run, None)
        with stack.output_burst():
            for i in range(5):
                stack.send_udp(bytes([i]) * 1000, src=target, dst=client)
            stack.send_udp(b"end", src=target, dst=client)
            stack.send_udp(b"x" * 1000, src=other, dst=client)
        stack.send_udp(b"alone", src=other, dst=client)
        reads = [theirs.recv(70000) for _ in range(3)]
        with pytest.raises(BlockingIOError):
            theirs.recv(70000)
        nursery.cancel_scope.cancel()
    headers = [struct.unpack("=BBHHHH", r[:10]) for r in reads]
    assert headers[0] == (NEEDS_CSUM, GSO_UDP_L4, 28, 1000, 20, 6)
    joined = reads[0][10:]
    assert len(joined) == 20 + 8 + 5003 and joined[24:26] == struct.pack("!H", 8 + 5003)
    assert joined[28:] == b"".join(bytes([i]) * 1000 for i in range(5)) + b"end"
    assert headers[1] == headers[2] == (0, 0, 0, 0, 0, 0)  # one datagram each, checksummed
    assert is_valid(reads[1][10:]) and is_valid(reads[2][10:])
    assert parse(reads[2][10:]).payload == b"alone"
    assert stack.statistics().counters["output_gso_udp_writes"] == 1
