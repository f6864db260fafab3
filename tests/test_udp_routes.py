"""Routes on UDP sessions (``egress.udp_routes``) on the in-memory device.

Why: the bounds are what the namespace tests (tests/integration/test_udp_routes_netns.py)
cannot pin down exactly: a rejected or dropped flow is decided and recorded once per session
however many datagrams follow, each answered (reject) or counted (drop); a proxied session
keeps at most ``PENDING_DATAGRAMS`` while its association opens, and its end (eviction) closes
the connection to the proxy at once; a proxy that refuses fails the flow with ICMP host
unreachable. Proxies here are plain sockets on loopback that accept and stay silent or refuse.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from tunlwip import MemoryDevice
from tunlwip.config.routes import Route
from tunlwip.egress.udp_routes import PENDING_DATAGRAMS
from tunlwip.egress.via import Drop, Reject, Socks5Proxy
from tunlwip.flows import FlowRecord, FlowSubscription
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.udp import UdpConfig

from harness import on_loopback
from packets import udp_packet
from tcppeer import PacketWire

CLIENT = "198.18.0.2"
TARGET = "198.18.9.9"  # never reached: every test's route keeps the flow off a direct path


class Env:
    def __init__(self, gateway: Gateway, wire: PacketWire, device: MemoryDevice,
                 records: FlowSubscription) -> None:  # fmt: skip
        self.gateway, self.wire, self.device, self.records = gateway, wire, device, records

    def send(self, sport: int, payload: bytes = b"x", dport: int = 7000) -> None:
        self.device.inject_packet(udp_packet(CLIENT, TARGET, sport, dport, payload))

    async def emitted(self) -> list[Any]:
        await trio.testing.wait_all_tasks_blocked()
        return self.wire.unmatched_nowait()

    def closed(self) -> list[FlowRecord]:
        found = []
        while True:
            try:
                found.append(self.records.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return found


async def start(nursery: trio.Nursery, *routes: Route, udp: UdpConfig | None = None) -> Env:
    device = MemoryDevice()
    config = GatewayConfig(routes=routes, udp=udp or UdpConfig())
    gateway = Gateway(device, on_loopback(config))
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return Env(gateway, wire, device, gateway.flows())


async def test_reject_answers_every_datagram_and_decides_once(nursery: trio.Nursery) -> None:
    env = await start(nursery, Route(name="no", via=Reject()))
    for _ in range(3):
        env.send(5000)
    answers = await env.emitted()
    assert [(a.icmp_type, a.icmp_code) for a in answers] == [(3, 3)] * 3, answers
    assert {(a.src, a.dst) for a in answers} == {(TARGET, CLIENT)}
    stats = env.gateway.statistics()
    assert stats.udp.refused_by_route == 3 and stats.udp.opened == 1
    assert stats.routes is not None
    assert stats.routes.rejected["no"] == 1 and stats.routes.flows_udp["no"] == 1
    (record,) = env.closed()
    assert (record.route, record.close_reason) == ("no", "rejected by route"), record


async def test_drop_counts_datagrams_and_decides_once_per_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(nursery, Route(name="quiet", via=Drop()),
                      udp=UdpConfig(idle_timeout=5, sweep_interval=1))  # fmt: skip
    for _ in range(5):
        env.send(5000)
    assert await env.emitted() == []
    stats = env.gateway.statistics()
    assert stats.udp.dropped_by_route == 5 and stats.udp_sessions == 1
    assert stats.routes is not None and stats.routes.dropped["quiet"] == 1
    (record,) = env.closed()
    assert (record.route, record.close_reason) == ("quiet", "dropped by route"), record
    await trio.sleep(7)  # idle: the session ends, and the flow coming back is decided again
    assert env.gateway.statistics().udp_sessions == 0
    env.send(5000)
    await trio.testing.wait_all_tasks_blocked()
    stats = env.gateway.statistics()
    assert stats.routes is not None and stats.routes.dropped["quiet"] == 2
    assert len(env.closed()) == 1


async def test_proxied_session_queues_a_bounded_number_and_its_end_closes_the_proxy_connection(
    nursery: trio.Nursery,
) -> None:
    """A proxy that accepts and never answers: the session's datagrams wait, at most
    PENDING_DATAGRAMS of them (the rest dropped and counted); evicting the session closes the
    connection to the proxy at once (the proxy reads EOF) and records the flow as evicted."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    udp = UdpConfig(max_sessions=1, max_sessions_per_client=1, when_full="evict")
    env = await start(nursery, Route(name="px", via=Socks5Proxy("127.0.0.1", port)), udp=udp)
    extra = 6
    for i in range(PENDING_DATAGRAMS + extra):
        env.send(5000, b"%d" % i)
    with trio.fail_after(5):
        conn, _ = await listener.accept()
        assert await conn.recv(10) == b"\x05\x01\x00"  # the SOCKS5 greeting, then silence
    await trio.testing.wait_all_tasks_blocked()
    assert env.gateway.statistics().udp.dropped_from_client == extra
    env.send(5001)  # a new flow evicts the waiting one
    with trio.fail_after(5):
        assert await conn.recv(10) == b"", "the proxy connection must close with the session"
    (record,) = env.closed()
    assert (record.route, record.close_reason) == ("px", "evicted"), record
    conn.close()
    listener.close()


async def test_a_refusing_proxy_fails_the_flow_with_host_unreachable(
    nursery: trio.Nursery,
) -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens there once the probe closes
    env = await start(nursery, Route(name="px", via=Socks5Proxy("127.0.0.1", closed)))
    env.send(5000, b"hello")
    with trio.fail_after(5):
        answer = await env.wire.next_unmatched()
    assert (answer.icmp_type, answer.icmp_code) == (3, 1), answer
    await trio.testing.wait_all_tasks_blocked()
    stats = env.gateway.statistics()
    assert stats.routes is not None and stats.routes.proxy_failures["px"] == 1
    assert stats.udp_sessions == 0, "the next datagram tries the proxy again"
    (record,) = env.closed()
    assert (record.route, record.close_reason) == ("px", "proxy: refused"), record
