"""UDP sessions, the QUIC policy and ICMP echo on the in-memory device.

Why: the session lifecycle (idle expiry in either direction, the cap) must be exact, which only
trio's virtual clock shows; the packet-level answers (ICMP port unreachable quoting the
datagram, echo replies from the pinged address, fragmented replies) are checked with the
independent parser in tests/packets.py. Upstreams are real sockets on loopback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing

from tunlwip import MemoryDevice, StackConfig
from tunlwip.endpoint import Endpoint
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.udp import UdpConfig, UdpSession

from harness import on_loopback
from packets import PROTO_ICMP, Parsed, fragment, icmp_echo, ip_packet, udp_packet
from tcppeer import PacketWire

CLIENT4, CLIENT6 = "198.18.0.2", "fd00:18::2"
FAMILIES = [(CLIENT4, "203.0.113.9"), (CLIENT6, "2001:db8::9")]


class Env:
    def __init__(self, gateway: Gateway, device: MemoryDevice, wire: PacketWire) -> None:
        self.gateway, self.device, self.wire = gateway, device, wire

    def counters(self) -> Mapping[str, int]:
        return self.gateway.statistics().stack.counters

    async def emitted(self) -> list[Any]:
        await trio.testing.wait_all_tasks_blocked()
        return self.wire.unmatched_nowait()


async def start(nursery: trio.Nursery, config: GatewayConfig | None = None, **kw: Any) -> Env:
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config), **kw)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return Env(gateway, device, wire)


def quoted_flow(icmp_body: bytes) -> tuple[str, int, str, int]:
    """(src, sport, dst, dport) of the datagram an ICMP error quotes; the quote may be cut
    after the UDP header, so it is read field by field rather than parsed as a packet."""
    if icmp_body[0] >> 4 == 4:
        hlen = (icmp_body[0] & 0x0F) * 4
        src, dst = icmp_body[12:16], icmp_body[16:20]
    else:
        hlen, src, dst = 40, icmp_body[8:24], icmp_body[24:40]
    sport, dport = struct.unpack_from("!HH", icmp_body, hlen)
    return str(ipaddress.ip_address(src)), sport, str(ipaddress.ip_address(dst)), dport


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- default forwarding ---------------------------------------------------------------------------


async def test_datagrams_are_forwarded_and_answered_from_the_destination(
    nursery: trio.Nursery, echo_server: int
) -> None:
    env = await start(nursery)
    for seq in range(5):
        env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", 5000, echo_server, b"%d" % seq))
    replies: list[Parsed] = []
    with trio.fail_after(10):
        while len(replies) < 5:
            replies.append(await env.wire.next_unmatched())
    assert sorted(r.payload for r in replies) == [b"%d" % i for i in range(5)]
    assert {(r.src, r.sport, r.dst, r.dport) for r in replies} == {
        ("127.0.0.1", echo_server, CLIENT4, 5000)
    }
    assert all(r.l4_checksum_ok for r in replies)
    stats = env.gateway.statistics()
    assert stats.udp_sessions == 1 and stats.udp.opened == 1 and stats.udp.datagrams_out == 5


async def test_closed_upstream_port_is_mirrored_as_port_unreachable(nursery: trio.Nursery) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # free again once the probe closes
    env = await start(nursery)
    env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", 5001, closed_port, b"hello"))
    with trio.fail_after(10):
        reply = await env.wire.next_unmatched()
    assert (reply.icmp_type, reply.icmp_code) == (3, 3)
    assert (reply.src, reply.dst) == ("127.0.0.1", CLIENT4) and reply.l4_checksum_ok
    assert quoted_flow(reply.payload) == (CLIENT4, 5001, "127.0.0.1", closed_port)


# -- the embedding API ----------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "target"), FAMILIES)
async def test_udp_handler_replaces_forwarding(
    nursery: trio.Nursery, client: str, target: str
) -> None:
    sessions: list[UdpSession] = []

    async def handler(session: UdpSession) -> None:
        sessions.append(session)
        while True:
            data = await session.receive()
            await session.send(data.upper())

    env = await start(nursery, udp_handler=handler)
    env.device.inject_packet(udp_packet(client, target, 4000, 7777, b"ping"))
    with trio.fail_after(10):
        reply = await env.wire.next_unmatched()
    assert (reply.src, reply.sport, reply.dst, reply.dport, reply.payload) == (
        target, 7777, client, 4000, b"PING")  # fmt: skip
    session = sessions[0]
    assert session.client == Endpoint.parse(client, 4000)
    assert session.target == Endpoint.parse(target, 7777)

    # send_udp: any source address and port, no session needed
    env.gateway.send_udp(
        b"unsolicited", src=Endpoint.parse(target, 1), dst=Endpoint.parse(client, 4000)
    )
    with trio.fail_after(10):
        reply = await env.wire.next_unmatched()
    assert (reply.src, reply.sport, reply.payload) == (target, 1, b"unsolicited")


@pytest.mark.parametrize(("client", "target"), FAMILIES)
async def test_big_datagrams_both_ways(nursery: trio.Nursery, client: str, target: str) -> None:
    async def echo(session: UdpSession) -> None:
        while True:
            await session.send(await session.receive())

    env = await start(nursery, udp_handler=echo)
    payload = os.urandom(16 * 1024)
    for frag in fragment(udp_packet(client, target, 4001, 9000, payload), 1500):
        env.device.inject_packet(frag)
    frags: list[Parsed] = []
    with trio.fail_after(10):
        while sum(len(f.payload) for f in frags) < len(payload) + 8:
            frags.append(await env.wire.next_unmatched())
    assert len(frags) > 10 and all(len(f.raw) <= 1500 for f in frags)
    data = b"".join(f.payload for f in sorted(frags, key=lambda f: f.frag_offset))
    assert data[8:] == payload


# -- session lifecycle on the virtual clock -------------------------------------------------------


async def test_one_way_traffic_keeps_sessions_alive_and_idle_ones_expire(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    ended: dict[int, tuple[str, float]] = {}

    async def handler(session: UdpSession) -> None:
        port = session.client.port
        try:
            if port == 1:  # talks to the client every 10 s, never hears from it
                while True:
                    await trio.sleep(10)
                    await session.send(b"tick")
            else:
                while True:
                    await session.receive()
        finally:
            ended[port] = (session.end_reason or "cancelled", trio.current_time())

    config = GatewayConfig(udp=UdpConfig(idle_timeout=60, sweep_interval=5))
    env = await start(nursery, config, udp_handler=handler)
    t0 = trio.current_time()
    for port in (1, 2, 3):
        env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", port, 9999, b"hi"))
    for _ in range(20):  # the client of session 2 sends every 10 s for 200 s
        await trio.sleep(10)
        env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 2, 9999, b"hi"))
    assert set(ended) == {3}
    reason, when = ended[3]
    assert reason == "idle" and 60 <= when - t0 <= 65  # at the first sweep after the timeout
    assert env.gateway.statistics().udp.expired == 1 and len(env.gateway.udp) == 2


async def test_idle_session_releases_its_socket(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, echo_server: int
) -> None:
    env = await start(nursery, GatewayConfig(udp=UdpConfig(idle_timeout=30, sweep_interval=1)))
    before = open_fds()
    env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", 6000, echo_server, b"x"))
    with trio.fail_after(10):
        await env.wire.next_unmatched()
    assert open_fds() == before + 1 and len(env.gateway.udp) == 1
    await trio.sleep(31 + 1)
    await trio.testing.wait_all_tasks_blocked()
    assert open_fds() == before and len(env.gateway.udp) == 0


async def test_default_sessions_need_no_task_and_eviction_closes_their_sockets(
    nursery: trio.Nursery, echo_server: int
) -> None:
    # One client may hold the whole table here: this is about eviction at the global cap.
    udp = UdpConfig(max_sessions=20, when_full="evict", max_sessions_per_client=20)
    env = await start(nursery, GatewayConfig(udp=udp))
    await trio.testing.wait_all_tasks_blocked()
    tasks_before, fds_before = trio.lowlevel.current_statistics().tasks_living, open_fds()
    with env.gateway.flows() as records:
        for ports in (range(7000, 7020), range(7020, 7030)):  # a cap of 20: 10 evictions
            for port in ports:
                env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", port, echo_server, b"x"))
            with trio.fail_after(10):
                replies = [await env.wire.next_unmatched() for _ in ports]
            assert sorted(r.dport for r in replies) == list(ports)
        await trio.testing.wait_all_tasks_blocked()
        stats = env.gateway.statistics()
        assert stats.udp_sessions == 20 and stats.udp.evicted == 10
        assert trio.lowlevel.current_statistics().tasks_living == tasks_before  # no task each
        assert open_fds() == fds_before + 20  # the evicted sessions' sockets are closed
        with trio.fail_after(10):
            evicted = [await records.__anext__() for _ in range(10)]
        assert sorted(r.client.port for r in evicted) == list(range(7000, 7010))
        assert {r.close_reason for r in evicted} == {"evicted"}


async def test_new_flows_beyond_the_session_cap_are_refused_and_old_ones_keep_working(
    nursery: trio.Nursery, echo_server: int
) -> None:
    udp = UdpConfig(max_sessions=20, max_sessions_per_client=20)  # the global cap, one client
    env = await start(nursery, GatewayConfig(udp=udp))
    for port in range(7000, 7020):
        env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", port, echo_server, b"x"))
    with trio.fail_after(10):
        replies = [await env.wire.next_unmatched() for _ in range(20)]
    assert sorted(r.dport for r in replies) == list(range(7000, 7020))
    for port in range(7020, 7025):  # over the cap: port unreachable, quoting the datagram
        env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", port, echo_server, b"y"))
        with trio.fail_after(1):
            refusal = await env.wire.next_unmatched()
        assert (refusal.proto, refusal.icmp_type, refusal.icmp_code) == (1, 3, 3)
        assert refusal.src == "127.0.0.1" and refusal.dst == CLIENT4
    for port in (7000, 7019):  # the sessions already open are untouched
        env.device.inject_packet(udp_packet(CLIENT4, "127.0.0.1", port, echo_server, b"z"))
        with trio.fail_after(10):
            reply = await env.wire.next_unmatched()
        assert (reply.dport, reply.payload) == (port, b"z")
    stats = env.gateway.statistics()
    assert stats.udp_sessions == 20 and stats.udp.refused_full == 5 and stats.udp.evicted == 0


async def test_dns_sessions_use_the_shorter_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(session: UdpSession) -> None:
        await trio.sleep_forever()

    config = GatewayConfig(udp=UdpConfig(idle_timeout=60, dns_idle_timeout=10, sweep_interval=1))
    env = await start(nursery, config, udp_handler=handler)
    env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 7, 53, b"q"))
    env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 8, 54, b"q"))
    await trio.sleep(12)
    assert [s.target.port for s in env.gateway.udp._table._sessions.values()] == [54]


async def test_the_cap_evicts_the_least_recently_active_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sessions: dict[int, UdpSession] = {}

    async def handler(session: UdpSession) -> None:
        sessions[session.client.port] = session
        while True:
            await session.receive()

    env = await start(
        nursery,
        GatewayConfig(udp=UdpConfig(max_sessions=3, when_full="evict")),
        udp_handler=handler,
    )
    for port in (1, 2, 3, 1):  # 1, 2, 3 open; then 1 is active again: 2 is now the oldest
        env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", port, 9999, b"x"))
        await trio.sleep(1)
    env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 4, 9999, b"x"))
    await trio.sleep(1)
    assert sessions[2].end_reason == "evicted"
    assert all(not sessions[p].end_reason for p in (1, 3, 4))
    stats = env.gateway.statistics()
    assert stats.udp.evicted == 1 and stats.udp_sessions == 3


async def test_a_full_session_queue_drops_and_counts(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def slow(session: UdpSession) -> None:
        await release.wait()

    env = await start(nursery, GatewayConfig(udp=UdpConfig(queue_datagrams=4)), udp_handler=slow)
    for _ in range(10):
        env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 1, 9999, b"x"))
    await trio.testing.wait_all_tasks_blocked()
    assert env.gateway.statistics().udp.dropped_from_client == 6
    release.set()


# -- QUIC policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "target"), FAMILIES)
async def test_quic_is_rejected_with_port_unreachable(
    nursery: trio.Nursery, client: str, target: str
) -> None:
    env = await start(nursery)
    env.device.inject_packet(udp_packet(client, target, 50000, 443, b"\xc0quic initial"))
    (reply,) = await env.emitted()
    assert (reply.icmp_type, reply.icmp_code) == ((3, 3) if ":" not in client else (1, 4))
    assert reply.dst == client and reply.l4_checksum_ok
    assert quoted_flow(reply.payload) == (client, 50000, target, 443)
    assert env.counters()["udp_port_rejected"] == 1 and env.gateway.statistics().udp.opened == 0


async def test_quic_drop_and_off_modes(nursery: trio.Nursery) -> None:
    opened: list[int] = []

    async def handler(session: UdpSession) -> None:
        opened.append(session.target.port)

    drop = GatewayConfig(stack=StackConfig(blocked_udp_action="drop", blocked_udp_ports=(8443,)))
    env = await start(nursery, drop, udp_handler=handler)
    env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 1, 8443, b"x"))
    env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 1, 443, b"x"))  # not listed now
    assert await env.emitted() == []
    assert env.counters()["drop_udp_port_blocked"] == 1 and opened == [443]


async def test_quic_off_lets_443_through(nursery: trio.Nursery) -> None:
    opened: list[int] = []

    async def handler(session: UdpSession) -> None:
        opened.append(session.target.port)

    env = await start(
        nursery, GatewayConfig(stack=StackConfig(blocked_udp_action="off")), udp_handler=handler
    )
    env.device.inject_packet(udp_packet(CLIENT4, "203.0.113.1", 1, 443, b"x"))
    await trio.testing.wait_all_tasks_blocked()
    assert opened == [443] and env.counters()["udp_port_rejected"] == 0


# -- ICMP echo ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "target"), FAMILIES)
@pytest.mark.parametrize("size", [56, 4000])
async def test_echo_to_any_address_is_answered_from_it(
    nursery: trio.Nursery, client: str, target: str, size: int
) -> None:
    env = await start(nursery)
    payload = os.urandom(size)
    for frag in fragment(icmp_echo(client, target, 0x1234, 7, payload), 1500):
        env.device.inject_packet(frag)
    replies = await env.emitted()
    assert replies and all(r.src == target and r.dst == client for r in replies)
    whole = b"".join(r.payload for r in sorted(replies, key=lambda r: r.frag_offset))
    if len(replies) == 1:
        r = replies[0]
        assert r.icmp_type in (0, 129) and (r.icmp_ident, r.icmp_seq) == (0x1234, 7)
        assert r.payload == payload and r.l4_checksum_ok
    else:  # fragmented: the first fragment carries the ICMP header
        assert all(len(r.raw) <= 1500 for r in replies)
        assert whole[8:] == payload
    assert env.counters()["icmp_echo_replied"] == 1


async def test_echo_off_ignores_others_but_answers_for_the_gateway(nursery: trio.Nursery) -> None:
    env = await start(nursery, GatewayConfig(stack=StackConfig(icmp_echo="off")))
    env.device.inject_packet(icmp_echo(CLIENT4, "203.0.113.1", 1, 1, b"x"))
    env.device.inject_packet(icmp_echo(CLIENT6, "2001:db8::1", 1, 1, b"x"))
    assert await env.emitted() == []
    assert env.counters()["drop_echo_off"] == 2
    env.device.inject_packet(icmp_echo(CLIENT4, "198.18.0.1", 1, 1, b"x"))
    env.device.inject_packet(icmp_echo(CLIENT6, "fd00:18::1", 1, 1, b"x"))
    assert {r.src for r in await env.emitted()} == {"198.18.0.1", "fd00:18::1"}


async def test_forward_falls_back_to_reply_when_ping_sockets_are_refused(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("tunlwip.gateway.unavailable_reason", lambda: "not permitted (test)")
    env = await start(nursery, GatewayConfig(stack=StackConfig(icmp_echo="forward")))
    assert "falling back to reply" in caplog.text
    env.device.inject_packet(icmp_echo(CLIENT4, "203.0.113.1", 1, 1, b"x"))
    (reply,) = await env.emitted()
    assert reply.icmp_type == 0 and reply.src == "203.0.113.1"


# -- bad input ------------------------------------------------------------------------------------


async def test_bad_icmp_and_udp_input_is_counted(nursery: trio.Nursery) -> None:
    env = await start(nursery)
    good = icmp_echo(CLIENT4, "203.0.113.1", 1, 1, b"payload")
    bad_sum = bytearray(good)
    bad_sum[-1] ^= 0xFF
    env.device.inject_packet(bytes(bad_sum))
    env.device.inject_packet(ip_packet(CLIENT4, "203.0.113.1", PROTO_ICMP, b"\x08\0\xf7\xff"))
    v6 = bytearray(icmp_echo(CLIENT6, "2001:db8::1", 1, 1, b"payload"))
    v6[-1] ^= 0xFF
    env.device.inject_packet(bytes(v6))
    bad_len = bytearray(udp_packet(CLIENT4, "203.0.113.1", 1, 443, b"x"))
    bad_len[24:26] = struct.pack("!H", 200)  # UDP length beyond the packet
    env.device.inject_packet(bytes(bad_len))
    assert await env.emitted() == []
    c = env.counters()
    assert c["drop_transport_checksum"] == 2 and c["drop_transport_header"] == 2
    assert c["icmp_echo_replied"] == 0 and c["udp_port_rejected"] == 0
