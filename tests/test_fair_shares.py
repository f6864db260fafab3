"""Fair shares per client in the gateway, on the in-memory device with loopback upstreams.

Why: a client that fills one of its shares (held SYNs, connections, UDP sessions, DNS
queries in flight) must be answered as at the global limit, another client must still get
through, the refusal must be counted per reason, and every count must return to zero on
every path that ends a flow (success, failure, timeout, reset, cancellation): a share that
leaks shrinks until its client is locked out for good.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from test_dns_proxy import SLOW, Upstream
from test_gateway import serve_sha256, upload_and_check_digest
from tunlwip import MemoryDevice
from tunlwip.dns.proxy import DnsConfig
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.held_dials import HeldDial
from tunlwip.stack import StackConfig
from tunlwip.udp import UdpConfig

from harness import on_loopback
from packets import RST, SYN, parse, tcp_packet, udp_packet
from tcppeer import PacketWire, TcpPeer

A, B = "198.18.0.2", "198.18.0.3"
GW4 = "198.18.0.1"


class Env:
    def __init__(self, gateway: Gateway, device: MemoryDevice, wire: PacketWire,
                 scope: trio.CancelScope) -> None:  # fmt: skip
        self.gateway, self.device, self.wire, self.scope = gateway, device, wire, scope

    async def emitted(self) -> list[Any]:
        await trio.testing.wait_all_tasks_blocked()
        return self.wire.unmatched_nowait()


async def start(nursery: trio.Nursery, config: GatewayConfig) -> Env:
    """A gateway in its own cancel scope (so a test can stop it and look at what is left)."""
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config))
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await gateway.serve(task_status=task_status)

    await nursery.start(serve)
    return Env(gateway, device, wire, scope)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (what the gateway does is spread over its tasks) for up to 10 s."""
    for _ in range(1000):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# -- held SYNs ---------------------------------------------------------------------------------


async def test_a_client_at_its_dial_share_gets_rst_and_another_still_connects(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client A's dials never finish (as to a black hole): its first 3 SYNs are held, the next
    ones get RST at once (``refused.client_share_dials``, not ``pending_dials``); client B is
    dialed and relays byte-exact. At the dial timeout A's held SYNs get ICMP unreachable and
    every per-client count is back to zero, B's connection too once it closed."""
    port = await nursery.start(serve_sha256)
    config = GatewayConfig(dial_timeout=1.0, max_pending_dials=40, max_pending_dials_per_client=3)
    env = await start(nursery, config)
    dials = env.gateway._tcp.dials
    assert dials is not None
    finish = dials._finished

    def black_hole_for_a(dial: HeldDial) -> None:  # A's connects "never" complete
        if str(dial.key[0].address) == A:
            dials._unwatch(dial)
        else:
            finish(dial)

    monkeypatch.setattr(dials, "_finished", black_hole_for_a)
    for sport in range(41000, 41006):
        env.device.inject_packet(tcp_packet(A, "127.0.0.1", sport, port, seq=1, flags=SYN))
    refusals = await env.emitted()
    assert sorted(r.dport for r in refusals) == [41003, 41004, 41005]
    assert all(parse(r.raw).flags & RST for r in refusals)
    assert dials.dialing_for(ipaddress.ip_address(A)) == 3
    peer = TcpPeer(env.wire, B, 42000, "127.0.0.1", port)
    await peer.connect()
    await upload_and_check_digest(peer, 200_000)
    refused = env.gateway.statistics().refused
    assert (refused.client_share_dials, refused.pending_dials) == (3, 0)
    with trio.fail_after(5):
        unreachable = [await env.wire.next_unmatched() for _ in range(3)]
    assert {(u.proto, u.icmp_type) for u in unreachable} == {(1, 3)}
    assert len(dials) == 0 and dials.per_client_total() == 0
    stack = env.gateway.stack
    await until(lambda: stack.client_connections.total() == 0, "B's connection released")
    assert not stack._connections.clients


# -- connections --------------------------------------------------------------------------------


@pytest.mark.parametrize("dial_before_accept", [True, False])
async def test_a_client_at_its_connection_share_gets_rst_and_counts_return_to_zero(
    nursery: trio.Nursery, dial_before_accept: bool
) -> None:
    """``max_tcp_connections_per_client = 2``: A's third connection is refused with RST (at the
    SYN when dialing before accept, after the handshake otherwise, as at the global limit),
    B still connects, and the
    counts return to zero whether A's connections end by a reset or a clean close."""
    port = await nursery.start(serve_sha256)
    stack = StackConfig(max_tcp_connections_per_client=2)
    env = await start(nursery, GatewayConfig(stack=stack, dial_before_accept=dial_before_accept))
    held = [TcpPeer(env.wire, A, 43000 + i, "127.0.0.1", port) for i in range(2)]
    for peer in held:
        await peer.connect()
    third = TcpPeer(env.wire, A, 43002, "127.0.0.1", port)
    if dial_before_accept:  # refused at the SYN
        with pytest.raises(ConnectionRefusedError):
            await third.connect()
    else:  # lwIP's accept comes after the handshake: then RST, as at max_tcp_connections
        await third.connect()
        with pytest.raises(ConnectionResetError):
            await third.recv()
    other = TcpPeer(env.wire, B, 43100, "127.0.0.1", port)
    await other.connect()
    await upload_and_check_digest(other, 100_000)
    stats = env.gateway.statistics()
    assert stats.refused.client_share_connections == 1 and stats.refused.tcp_connections == 0
    held[0].send_rst()  # one ends by a reset ...
    await upload_and_check_digest(held[1], 1000)  # ... one cleanly
    clients = env.gateway.stack.client_connections
    await until(lambda: clients.total() == 0, "every connection released")
    again = TcpPeer(env.wire, A, 43003, "127.0.0.1", port)  # A has its share back
    await again.connect()
    await upload_and_check_digest(again, 1000)


# -- UDP sessions -------------------------------------------------------------------------------


async def test_a_client_at_its_udp_share_gets_port_unreachable(
    nursery: trio.Nursery, echo_server: int
) -> None:
    """``max_sessions_per_client = 3``: A's fourth flow gets ICMP port unreachable (as at
    ``max_sessions``), B's flow is echoed, the refusal is counted, and once the sessions idle
    out the table holds nobody."""
    udp = UdpConfig(max_sessions=100, max_sessions_per_client=3, idle_timeout=0.3,
                    sweep_interval=0.1)  # fmt: skip
    env = await start(nursery, GatewayConfig(udp=udp))
    for sport in range(7000, 7003):
        env.device.inject_packet(udp_packet(A, "127.0.0.1", sport, echo_server, b"a"))
    with trio.fail_after(5):
        echoes = [await env.wire.next_unmatched() for _ in range(3)]
    assert sorted(e.dport for e in echoes) == [7000, 7001, 7002]
    env.device.inject_packet(udp_packet(A, "127.0.0.1", 7003, echo_server, b"a"))
    with trio.fail_after(5):
        refusal = await env.wire.next_unmatched()
    assert (refusal.proto, refusal.icmp_type, refusal.icmp_code, refusal.dst) == (1, 3, 3, A)
    env.device.inject_packet(udp_packet(B, "127.0.0.1", 7100, echo_server, b"b"))
    with trio.fail_after(5):
        echo = await env.wire.next_unmatched()
    assert (echo.dst, echo.dport, echo.payload) == (B, 7100, b"b")
    stats = env.gateway.statistics()
    assert stats.udp.refused_client_share == stats.refused.client_share_udp_sessions == 1
    assert stats.udp.refused_full == 0 and stats.udp_sessions == 4
    table = env.gateway.udp._table
    await until(lambda: len(table) == 0 and table.clients() == 0, "sessions idle out")


async def test_with_evict_a_client_at_its_share_replaces_its_own_oldest_session(
    nursery: trio.Nursery, echo_server: int
) -> None:
    """``when_full = "evict"``: B holds a session; A at its share evicts A's least recently
    active session, never B's."""
    udp = UdpConfig(max_sessions=100, max_sessions_per_client=2, when_full="evict")
    env = await start(nursery, GatewayConfig(udp=udp))
    env.device.inject_packet(udp_packet(B, "127.0.0.1", 7100, echo_server, b"b"))
    for sports in ((7000, 7001), (7002,)):  # the third evicts the first
        for sport in sports:
            env.device.inject_packet(udp_packet(A, "127.0.0.1", sport, echo_server, b"a"))
        with trio.fail_after(5):
            for _ in range(len(sports) + (sports[0] == 7000)):
                await env.wire.next_unmatched()
    table = env.gateway.udp._table
    ports = sorted((str(s.client.address), s.client.port) for s in table.all())
    assert ports == [(A, 7001), (A, 7002), (B, 7100)]
    stats = env.gateway.statistics()
    assert stats.udp.evicted == 1 and stats.udp.refused_client_share == 0


async def test_ipv6_clients_share_per_64(nursery: trio.Nursery) -> None:
    """Two addresses of one /64 count as one client; another /64 has its own share."""
    sessions: list[Any] = []

    async def hold(session: Any) -> None:
        sessions.append(session)
        await trio.sleep_forever()

    udp = UdpConfig(max_sessions=100, max_sessions_per_client=2)
    device = MemoryDevice()
    gateway = Gateway(device, GatewayConfig(udp=udp), udp_handler=hold)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    for client in ("fd00:18::2", "fd00:18::3", "fd00:18::4", "fd00:18:0:1::2"):
        device.inject_packet(udp_packet(client, "2001:db8::9", 5000, 9999, b"x"))
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(str(s.client.address) for s in sessions) == \
        ["fd00:18:0:1::2", "fd00:18::2", "fd00:18::3"]  # fmt: skip
    assert gateway.statistics().udp.refused_client_share == 1


# -- DNS queries in flight ----------------------------------------------------------------------


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    server = Upstream()
    await nursery.start(server.serve)
    return server


def ask(env: Env, name: str, client: str, sport: int, qid: int) -> None:
    query = dns.message.make_query(name, "A", use_edns=-1)
    query.id = qid
    env.device.inject_packet(udp_packet(client, GW4, sport, 53, query.to_wire()))


async def test_a_client_at_its_dns_share_gets_refused_and_another_is_answered(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """``max_in_flight_per_client = 2`` and a silent upstream: A's third query is answered
    REFUSED at once (``dns.client_share``, not ``overload``), B's query is resolved, and once
    A's queries timed out (SERVFAIL) nothing is counted in flight."""
    dns_config = DnsConfig(upstreams=(f"udp://127.0.0.1:{upstream.port}",), query_timeout=5.0,
                           attempt_timeout=5.0, max_in_flight_per_client=2)  # fmt: skip
    env = await start(nursery, GatewayConfig(dns=dns_config))
    proxy = env.gateway.dns
    assert proxy is not None
    for qid in (1, 2, 3):
        ask(env, SLOW, A, 6000, qid)
    with trio.fail_after(1):
        refused = await env.wire.next_unmatched()
    answer = dns.message.from_wire(refused.payload)
    assert (answer.id, answer.rcode()) == (3, dns.rcode.REFUSED)
    ask(env, "www.test", B, 6100, 1)
    with trio.fail_after(1):
        resolved = await env.wire.next_unmatched()
    assert resolved.dst == B and dns.message.from_wire(resolved.payload).answer
    stats = env.gateway.statistics()
    assert stats.dns is not None and (stats.dns.client_share, stats.dns.overload) == (1, 0)
    assert stats.refused.client_share_dns == 1
    with trio.fail_after(10):
        failed = [await env.wire.next_unmatched() for _ in range(2)]
    assert {dns.message.from_wire(f.payload).rcode() for f in failed} == {dns.rcode.SERVFAIL}
    assert proxy.in_flight == 0 and proxy.in_flight_per_client.total() == 0


async def test_dns_counts_return_to_zero_when_the_gateway_stops_mid_query(
    nursery: trio.Nursery, upstream: Upstream
) -> None:
    """Queries in flight over UDP and over TCP, one of them waiting for a pipelining slot,
    are cancelled by the gateway's stop: every in-flight count is released."""
    dns_config = DnsConfig(upstreams=(f"udp://127.0.0.1:{upstream.port}",), query_timeout=30,
                           attempt_timeout=30)  # fmt: skip
    env = await start(nursery, GatewayConfig(dns=dataclasses.replace(dns_config)))
    proxy = env.gateway.dns
    assert proxy is not None
    ask(env, SLOW, A, 6000, 1)
    peer = TcpPeer(env.wire, B, 44000, GW4, 53)
    await peer.connect()
    queries = b""
    for qid in range(1, 66):  # one more than a connection's pipelining slots (64)
        wire = dns.message.make_query(SLOW, "A").to_wire()
        wire = qid.to_bytes(2, "big") + wire[2:]
        queries += len(wire).to_bytes(2, "big") + wire
    await peer.send(queries)
    await until(lambda: proxy.in_flight == 66, "66 queries in flight")
    assert proxy.in_flight_per_client.snapshot() == {A: 1, B: 65}
    env.scope.cancel()
    await until(lambda: proxy.in_flight == 0, "the stop to cancel them")
    assert proxy.in_flight_per_client.total() == 0
