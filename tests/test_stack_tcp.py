"""TCP through lwIP on the in-memory device: accept-any, data, half-close, resets, timers."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
import trio

from harness import Harness
from packets import ACK, RST, SYN, tcp_options, tcp_packet
from tcppeer import TcpPeer

CLIENT4, CLIENT6 = "198.18.0.2", "fd00:18::2"


@pytest.mark.parametrize(("src", "dst"), [(CLIENT4, "203.0.113.7"), (CLIENT6, "2001:db8::7")])
async def test_syn_to_any_address_gets_syn_ack_from_that_address(
    harness: Harness, src: str, dst: str
) -> None:
    opts = tcp_options(mss=1460, wscale=7, sack_permitted=True)
    harness.device.inject_packet(
        tcp_packet(src, dst, 40000, 443, seq=1000, flags=SYN, options=opts)
    )
    with trio.fail_after(5):
        reply = await harness.wire.next_unmatched()
    assert (reply.src, reply.sport, reply.dst, reply.dport) == (dst, 443, src, 40000)
    assert reply.flags == SYN | ACK
    assert reply.ack == 1001
    assert reply.l4_checksum_ok and reply.ip_checksum_ok
    assert reply.tcp_options["wscale"] == 7


async def test_same_client_port_to_two_destinations_gives_two_connections(
    harness: Harness,
) -> None:
    a = TcpPeer(harness.wire, CLIENT4, 41000, "203.0.113.7", 443)
    b = TcpPeer(harness.wire, CLIENT4, 41000, "203.0.113.8", 443)
    await a.connect()
    await b.connect()
    sa, sb = await harness.next_stream(), await harness.next_stream()
    assert {str(sa.local), str(sb.local)} == {"203.0.113.7:443", "203.0.113.8:443"}
    assert str(sa.remote) == str(sb.remote) == "198.18.0.2:41000"
    await a.send(b"to-a")
    await b.send(b"to-b")
    got = {str(sa.local): await sa.receive_some(), str(sb.local): await sb.receive_some()}
    assert got == {"203.0.113.7:443": b"to-a", "203.0.113.8:443": b"to-b"}


@pytest.mark.parametrize(("src", "dst"), [(CLIENT4, "192.0.2.1"), (CLIENT6, "2001:db8::1")])
async def test_data_both_ways_with_correct_sequence_numbers(
    harness: Harness, src: str, dst: str
) -> None:
    peer = TcpPeer(harness.wire, src, 42000, dst, 80, isn=5000)
    await peer.connect()
    stream = await harness.next_stream()
    await peer.send(b"hello")
    assert await stream.receive_some() == b"hello"
    await stream.send_all(b"world!")
    assert await peer.recv_exactly(6) == b"world!"
    data_segments = [s for s in peer.segments if s.payload]
    assert peer.stack_isn is not None
    assert data_segments[0].seq == (peer.stack_isn + 1) % 2**32
    assert data_segments[0].ack == 5000 + 1 + 5
    await peer.wait_acked()
    assert stream.bytes_received == 5 and stream.bytes_sent == 6


async def test_client_fin_is_eof_while_other_direction_flows(harness: Harness) -> None:
    peer = TcpPeer(harness.wire, CLIENT4, 42001, "192.0.2.1", 80)
    await peer.connect()
    stream = await harness.next_stream()
    await peer.send(b"request")
    await peer.shutdown()
    assert await stream.receive_some() == b"request"
    assert await stream.receive_some() == b""
    await stream.send_all(b"response after client FIN")
    await stream.send_eof()
    assert await peer.recv_until_eof() == b"response after client FIN"


async def test_send_eof_sends_fin_and_client_can_still_send(harness: Harness) -> None:
    peer = TcpPeer(harness.wire, CLIENT6, 42002, "2001:db8::5", 80)
    await peer.connect()
    stream = await harness.next_stream()
    await stream.send_all(b"banner")
    await stream.send_eof()
    assert await peer.recv_until_eof() == b"banner"
    assert peer.eof_received
    await peer.send(b"still talking")
    assert await stream.receive_some() == b"still talking"
    await peer.shutdown()
    assert await stream.receive_some() == b""


async def test_client_rst_breaks_the_stream(harness: Harness) -> None:
    peer = TcpPeer(harness.wire, CLIENT4, 42003, "192.0.2.9", 22)
    await peer.connect()
    stream = await harness.next_stream()
    peer.send_rst()
    with pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x")


async def test_abort_resets_the_client(harness: Harness) -> None:
    peer = TcpPeer(harness.wire, CLIENT4, 42004, "192.0.2.9", 22)
    await peer.connect()
    stream = await harness.next_stream()
    stream.abort()
    with pytest.raises(ConnectionResetError):
        await peer.recv()
    assert peer.reset_received


@pytest.mark.parametrize(("src", "dst"), [(CLIENT4, "192.0.2.50"), (CLIENT6, "2001:db8::50")])
async def test_one_mebibyte_each_way_verified(
    harness: Harness, src: str, dst: str, autojump_clock: trio.abc.Clock
) -> None:
    upload = os.urandom(1 << 20)
    download = os.urandom(1 << 20)
    peer = TcpPeer(harness.wire, src, 43000, dst, 8080)
    await peer.connect()
    stream = await harness.next_stream()
    received = bytearray()

    async def server() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, download)
            while len(received) < len(upload):
                received.extend(await stream.receive_some())

    async with trio.open_nursery() as n:
        n.start_soon(server)
        n.start_soon(peer.send, upload)
        got = await peer.recv_exactly(len(download))
    assert hashlib.sha256(received).digest() == hashlib.sha256(upload).digest()
    assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()


async def test_hundred_concurrent_connections(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    peers = [TcpPeer(harness.wire, CLIENT4, 20000 + i, "192.0.2.77", 9000) for i in range(100)]
    async with trio.open_nursery() as n:
        for p in peers:
            n.start_soon(p.connect)
    streams = [await harness.next_stream() for _ in peers]
    by_port = {s.remote.port: s for s in streams}

    async def echo_one(peer: TcpPeer) -> None:
        msg = f"hello from {peer}".encode()
        await peer.send(msg)
        s = by_port[peer.sport]
        data = await s.receive_some()
        await s.send_all(data.upper())
        assert await peer.recv_exactly(len(msg)) == msg.upper()

    async with trio.open_nursery() as n:
        for p in peers:
            n.start_soon(echo_one, p)
    assert harness.stack.statistics().tcp_connections == 100


async def test_retransmission_happens_on_virtual_clock(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    """A SYN-ACK that the client never acknowledges is retransmitted by lwIP's timers."""
    harness.device.inject_packet(
        tcp_packet(CLIENT4, "192.0.2.3", 44000, 80, seq=1, flags=SYN, options=tcp_options(mss=1460))
    )
    start = trio.current_time()
    first = await harness.wire.next_unmatched()
    second = await harness.wire.next_unmatched()
    assert first.flags == second.flags == SYN | ACK
    assert first.seq == second.seq
    assert trio.current_time() - start >= 0.9  # lwIP's initial RTO is ~1-3 s


async def into_time_wait(harness: Harness, peer: TcpPeer) -> None:
    """Connect ``peer`` and close the connection from our side first: lwIP's end of it goes
    to TIME-WAIT once the peer's FIN is acknowledged."""
    await peer.connect()
    stream = await harness.next_stream()
    await stream.send_eof()
    assert await peer.recv_until_eof() == b""
    await peer.shutdown()
    assert await stream.receive_some() == b""
    await peer.wait_acked()


async def test_time_wait_expires_on_virtual_clock(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    peer = TcpPeer(harness.wire, CLIENT4, 45000, "192.0.2.4", 80)
    await into_time_wait(harness, peer)
    assert harness.stack.statistics().lwip_tcp_pcbs == 1  # our side is in TIME-WAIT
    await trio.sleep(11)  # 2 * TCP_MSL (5 s) + a timer tick
    assert harness.stack.statistics().lwip_tcp_pcbs == 0


async def test_new_syn_replaces_a_connection_in_time_wait(harness: Harness) -> None:
    """A client reusing its port while lwIP still holds the old 4-tuple in TIME-WAIT must get
    a new connection (as from Linux), not an ACK for the old one and a stall."""
    peer = TcpPeer(harness.wire, CLIENT4, 45001, "192.0.2.4", 80, isn=1000)
    await into_time_wait(harness, peer)
    peer.detach()
    assert harness.stack.statistics().lwip_tcp_pcbs == 1  # TIME-WAIT
    again = TcpPeer(harness.wire, CLIENT4, 45001, "192.0.2.4", 80, isn=500_000)
    await again.connect()
    assert (await harness.next_stream()).remote.port == 45001
    assert harness.stack.statistics().counters["time_wait_recycled"] == 1


async def test_time_wait_is_bounded_and_the_oldest_are_dropped(harness: Harness) -> None:
    """lwIP walks its TIME-WAIT list for every new SYN, so the gateway keeps only the newest 64
    there: the 65th connection that lwIP closes first pushes the oldest out, counted."""
    for i in range(70):
        peer = TcpPeer(harness.wire, CLIENT4, 46000 + i, "192.0.2.4", 80)
        await into_time_wait(harness, peer)
        peer.detach()
    stats = harness.stack.statistics()
    assert stats.lwip_tcp_pcbs <= 64 + 1  # the newest may enter before the next SYN trims
    assert stats.counters["time_wait_trimmed"] >= 70 - 64 - 1
    late = TcpPeer(harness.wire, CLIENT4, 46000 + 70, "192.0.2.4", 80)
    await late.connect()  # a new SYN trims first
    assert (await harness.next_stream()).remote.port == 46070
    assert harness.stack.statistics().counters["time_wait_trimmed"] >= 70 - 64


async def test_stray_ack_without_connection_gets_rst(harness: Harness) -> None:
    harness.device.inject_packet(
        tcp_packet(CLIENT4, "192.0.2.12", 41000, 80, seq=77, ack=5, flags=ACK)
    )
    reply = await harness.wire.next_unmatched()
    assert reply.flags & RST and reply.src == "192.0.2.12" and reply.sport == 80


async def test_new_connections_are_refused_while_python_holds_too_many_unread_bytes(
    harness: Harness,
) -> None:
    """The ``max_buffered_bytes`` budget: a handler that does not read keeps its client's
    bytes in Python; past the budget new connections get RST, counted, while the existing
    stream keeps its bytes and works on."""
    harness.stack.config = dataclasses.replace(harness.stack.config, max_buffered_bytes=1000)
    slow = TcpPeer(harness.wire, CLIENT4, 43000, "203.0.113.9", 80)
    await slow.connect()
    stream = await harness.next_stream()
    await slow.send(b"x" * 1500)  # nobody reads them yet
    await slow.wait_acked()
    assert harness.stack.buffered_bytes() == 1500
    late = TcpPeer(harness.wire, CLIENT4, 43001, "203.0.113.9", 80)
    await late.connect()  # lwIP completes the handshake, then refuses the connection
    with pytest.raises(ConnectionResetError):
        await late.recv()
    assert harness.stack.statistics().counters["tcp_refused_buffers_full"] == 1
    assert await stream.receive_some() == b"x" * 1500  # the existing flow is untouched
    again = TcpPeer(harness.wire, CLIENT4, 43002, "203.0.113.9", 80)
    await again.connect()
    assert (await harness.next_stream()).remote.port == 43002  # read: accepted again


async def test_a_stream_holds_at_most_its_per_connection_budget_and_loses_nothing(
    harness: Harness, autojump_clock: trio.abc.Clock
) -> None:
    """``max_buffered_bytes_per_connection``: a handler that reads slowly holds at most its
    budget in Python; lwIP keeps the rest (the client's window closes) and offers it again as
    the stream is read, so every byte arrives, in order."""
    budget = 100_000  # above lwIP's largest single delivery (64 KiB), below its window
    harness.stack.config = dataclasses.replace(
        harness.stack.config, max_buffered_bytes_per_connection=budget
    )
    upload = os.urandom(1_000_000)  # more than lwIP's window: the client waits for reads
    peer = TcpPeer(harness.wire, CLIENT4, 43100, "203.0.113.9", 80)
    await peer.connect()
    stream = await harness.next_stream()
    received = bytearray()
    peaks: list[int] = []

    async def slow_reader() -> None:
        while len(received) < len(upload):
            await trio.sleep(0.05)  # let the client fill everything it may
            peaks.append(harness.stack.buffered_bytes())
            received.extend(await stream.receive_some(5000))

    async with trio.open_nursery() as n:
        n.start_soon(slow_reader)
        await peer.send(upload)
    assert max(peaks) <= budget
    assert harness.stack.statistics().counters["tcp_recv_deferred"] > 0
    assert hashlib.sha256(received).digest() == hashlib.sha256(upload).digest()


async def test_a_client_that_opens_with_a_zero_window_then_a_small_one(harness: Harness) -> None:
    """A SYN offering no window, then a window smaller than the segments already queued: lwIP
    2.1.3 sized those segments to the MSS (its fallback for a zero window) and then aborted the
    process on the next write ("mss_local is too small"; found by the packet fuzzer). The
    stream keeps writing, and the bytes arrive in order once the window opens."""
    client, server = (CLIENT4, 43000), ("192.0.2.60", 80)
    harness.device.inject_packet(tcp_packet(CLIENT4, server[0], client[1], server[1],
                                            seq=1, flags=SYN, window=0))  # fmt: skip
    with trio.fail_after(5):
        synack = await harness.wire.next_unmatched()
    isn = synack.seq
    harness.device.inject_packet(tcp_packet(CLIENT4, server[0], client[1], server[1], seq=2,
                                            ack=isn + 1, flags=ACK, window=0))  # fmt: skip
    stream = await harness.next_stream()
    await stream.send_all(b"a" * 2000)  # queued: the window is closed
    harness.device.inject_packet(tcp_packet(CLIENT4, server[0], client[1], server[1], seq=2,
                                            ack=isn + 1, flags=ACK, window=256))  # fmt: skip
    await trio.sleep(0.1)
    await stream.send_all(b"b" * 100)  # lwIP's assertion fired here
    harness.device.inject_packet(tcp_packet(CLIENT4, server[0], client[1], server[1], seq=2,
                                            ack=isn + 1, flags=ACK, window=65535))  # fmt: skip
    received = b""
    with trio.fail_after(10):
        while len(received) < 2100:
            segment = await harness.wire.next_unmatched()
            if segment.payload and segment.seq == (isn + 1 + len(received)) % 2**32:
                received += segment.payload
    assert received == b"a" * 2000 + b"b" * 100
