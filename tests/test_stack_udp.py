"""UDP and fragments through the stack on the in-memory device."""

from __future__ import annotations

import os

import pytest
import trio

from harness import Harness
from packets import fragment, parse, tcp_options, tcp_packet, udp_packet
from tcppeer import TcpPeer

CASES = [("198.18.0.2", "203.0.113.9"), ("fd00:18::2", "2001:db8::9")]


@pytest.mark.parametrize(("src", "dst"), CASES)
async def test_udp_to_any_address_and_reply_from_it(
    udp_harness: Harness, src: str, dst: str
) -> None:
    harness = udp_harness
    got = harness.udp_received
    harness.device.inject_packet(udp_packet(src, dst, 5353, 53, b"query"))
    await trio.testing.wait_all_tasks_blocked()
    assert [(str(s.address), s.port, str(d.address), d.port, p) for s, d, p in got] == [
        (src, 5353, dst, 53, b"query")
    ]
    client, target, _ = got[0]
    harness.stack.send_udp(b"answer", src=target, dst=client)
    reply = await harness.wire.next_unmatched()
    assert (reply.src, reply.sport, reply.dst, reply.dport) == (dst, 53, src, 5353)
    assert reply.payload == b"answer" and reply.l4_checksum_ok


@pytest.mark.parametrize(("src", "dst"), CASES)
@pytest.mark.parametrize("size", [3000, 16 * 1024])
async def test_fragmented_datagrams_are_reassembled_and_big_replies_fragmented(
    udp_harness: Harness, src: str, dst: str, size: int
) -> None:
    harness = udp_harness
    got = harness.udp_received
    payload = os.urandom(size)
    for frag in reversed(fragment(udp_packet(src, dst, 7000, 9999, payload), 1500)):
        harness.device.inject_packet(frag)  # out of order on purpose
    await trio.testing.wait_all_tasks_blocked()
    assert len(got) == 1 and got[0][2] == payload
    assert harness.stack.statistics().counters["datagrams_reassembled"] == 1

    harness.stack.send_udp(payload[::-1], src=got[0][1], dst=got[0][0])
    await trio.testing.wait_all_tasks_blocked()
    frags = harness.wire.unmatched_nowait()
    assert len(frags) > 1 and all(len(f.raw) <= 1500 for f in frags)
    assert all(f.src == dst and f.dst == src and f.ip_checksum_ok for f in frags)
    data = b"".join(f.payload for f in sorted(frags, key=lambda f: f.frag_offset))
    assert data[8:] == payload[::-1]  # strip the UDP header carried by the first fragment


async def test_fragmented_tcp_segment_is_reassembled(harness: Harness) -> None:
    peer = TcpPeer(harness.wire, "198.18.0.2", 46000, "192.0.2.8", 80, isn=100)
    await peer.connect()
    stream = await harness.next_stream()
    data = os.urandom(1400)
    seg = tcp_packet("198.18.0.2", "192.0.2.8", 46000, 80, seq=101, ack=peer.ack, payload=data)
    for frag in fragment(seg, 600):
        harness.device.inject_packet(frag)
    assert await stream.receive_some() == data


async def test_udp_without_receiver_is_counted(harness: Harness) -> None:
    harness.device.inject_packet(udp_packet("198.18.0.2", "192.0.2.1", 1000, 2000, b"x"))
    await trio.testing.wait_all_tasks_blocked()
    assert harness.stack.statistics().counters["udp_unhandled"] == 1


async def test_syn_with_mss_option_to_v6_uses_v6_mss(harness: Harness) -> None:
    harness.device.inject_packet(
        tcp_packet(
            "fd00:18::2", "2001:db8::1", 1234, 80, seq=1, flags=0x02, options=tcp_options(mss=1440)
        )
    )
    reply = parse((await harness.wire.next_unmatched()).raw)
    assert reply.tcp_options["mss"] == 1440
