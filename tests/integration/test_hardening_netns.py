"""Crafted packets written into a real TUN against ``tunlwip up``: the gateway keeps running,
counts what it dropped, and still forwards byte-exact.

Why: one packet used to abort the whole gateway (issue 19): a segment half the sequence space
away, behind an IPv6 Destination Options header or in an IPv4 fragment train whose last
fragment claimed another protocol, reached lwIP's tcp_input past every check. Each case here is
what an attacker on the client side can send: raw packets through a packet socket on the TUN
(tests/integration/rawtun.py), with a Python TCP peer for the connections they target.

Split topology (as in test_gateway_netns.py)::

    [cli]                                 [gw]                          [srv]
    raw peer 198.18.0.9 / fd00:18::9      tunlwip up --no-offload       echo / digest servers
    kernel client 198.18.0.2 / ::2        lwIP 198.18.0.1, fd00:18::1   198.18.1.2, fd00:1::2
    T (packet sockets on it) ==== fd ===> sockets -- veth ------------- veth
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import dns.message
import pytest
import trio
import trio.lowlevel

from gatewayproc import RunningGateway, StartGateway, pattern
from netns import GATEWAY_ADDR4, GATEWAY_ADDR6, SRV_ADDR4, SRV_ADDR6, SplitTopology
from packets import (
    ACK,
    PSH,
    SYN,
    fragment,
    tcp_options,
    tcp_packet,
    udp_packet,
    with_ipv4_protocol,
    with_ipv6_extension,
)
from rawtun import RAW_CLIENT4, RAW_CLIENT6, RawTun
from tcppeer import PacketWire, TcpPeer
from transfers import connect, start_script_server, upload_and_check_digest

pytestmark = pytest.mark.netns

ECHO_PORT, DIGEST_PORT = 7000, 7001
HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS = 0, 43, 60
#: Every wait of the raw peer, in seconds of wall time.
PEER_TIMEOUT = 20.0


def counters(gw: RunningGateway) -> dict[str, int]:
    """The stack's counters from ``tunlwip status --json``."""
    found: dict[str, int] = gw.status()["totals"]["stack"]["counters"]
    return found


def assert_alive_and_forwarding(split: SplitTopology, gw: RunningGateway) -> None:
    """The gateway process still runs, and a kernel client's 1 MiB upload arrives intact (the
    digest server in srv checks every byte), over IPv4 and IPv6."""
    assert gw.proc.poll() is None, f"the gateway exited: {gw.tail()}"
    for family, host in ((socket.AF_INET, SRV_ADDR4), (socket.AF_INET6, SRV_ADDR6)):
        with connect(split.cli, family, host, DIGEST_PORT) as sock:
            upload_and_check_digest(sock, pattern(family, 1 << 20))
    assert counters(gw)["drop_unchecked"] == 0


def run_peer(raw: RawTun, scenario: Any) -> None:
    """Run ``await scenario(wire)`` with a PacketWire over ``raw``, bounded in time."""

    async def main() -> None:
        wire = PacketWire(raw, timeout=PEER_TIMEOUT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire.run)
            with trio.fail_after(4 * PEER_TIMEOUT):
                await scenario(wire)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def dns_over_tcp(peer: TcpPeer, query_id: int) -> None:
    """One DNS query on the peer's connection to the gateway's port 53; any answer with the
    query's ID proves the connection (and the proxy behind it) still works."""
    query = dns.message.make_query("alive.example.", "A")
    query.id = query_id
    wire = query.to_wire()
    await peer.send(struct.pack("!H", len(wire)) + wire)
    (length,) = struct.unpack("!H", await peer.recv_exactly(2))
    answer = dns.message.from_wire(await peer.recv_exactly(length))
    assert answer.id == query_id


def far_segment(peer: TcpPeer) -> bytes:
    """The segment that aborted lwIP: one byte, 2^31 from what the gateway expects next."""
    return tcp_packet(peer.src, peer.dst, peer.sport, peer.dport, seq=peer.seq + 2**31,
                      ack=peer.ack, flags=ACK | PSH, payload=b"x")  # fmt: skip


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_one_crafted_packet_no_longer_stops_the_gateway(
    split: SplitTopology, split_gateway: StartGateway
) -> None:
    """Connections from the raw peer to the DNS proxy's TCP port (accepted at once), then, to
    each: the far segment behind a Hop-by-Hop, Routing and Destination Options header (IPv6),
    in fragment trains whose last fragment names another protocol (IPv4: 99 and UDP; IPv6:
    UDP), and UDP with port 0 or a bad checksum to ff02::1 / ff01::1 behind an extension
    header. Each used to reach lwIP past the checks; each is dropped and counted, both
    connections still answer DNS, and the gateway still forwards byte-exact."""
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--no-offload", "--dns-upstream", f"udp://{SRV_ADDR4}")
    before = counters(gw)

    async def scenario(wire: PacketWire) -> None:
        v6 = TcpPeer(wire, RAW_CLIENT6, 41000, GATEWAY_ADDR6, 53, mss=1220,
                     timeout=PEER_TIMEOUT)  # fmt: skip
        v4 = TcpPeer(wire, RAW_CLIENT4, 41001, GATEWAY_ADDR4, 53, timeout=PEER_TIMEOUT)
        await v6.connect()
        await v4.connect()
        for kind in (HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS):
            wire.send(with_ipv6_extension(far_segment(v6), kind))
        for peer, step, others in ((v4, 28, (99, 17)), (v6, 56, (17,))):
            for other in others:
                first, *rest = fragment(far_segment(peer), step)
                last = rest[-1]
                if peer is v4:
                    last = with_ipv4_protocol(last, other)
                else:
                    last = last[:40] + bytes([other]) + last[41:]
                for piece in (first, *rest[:-1], last):
                    wire.send(piece)
        for dst in ("ff02::1", "ff01::1"):
            for checksum in (None, 0x1234):
                datagram = udp_packet(RAW_CLIENT6, dst, 4000, 0, b"x", checksum=checksum)
                wire.send(with_ipv6_extension(datagram, DESTINATION_OPTIONS))
        await dns_over_tcp(v6, 0x1111)
        await dns_over_tcp(v4, 0x2222)

    with RawTun(split.cli, gw.iface) as raw:
        run_peer(raw, scenario)
    after = counters(gw)
    grew = {k: after[k] - before[k] for k in ("drop_ip6_extension", "drop_fragment_protocol",
                                               "drop_unsupported")}  # fmt: skip
    print(f"dropped: {grew}")
    assert grew == {"drop_ip6_extension": 3 + 4, "drop_fragment_protocol": 2,
                    "drop_unsupported": 1}, gw.tail()  # fmt: skip
    assert_alive_and_forwarding(split, gw)


def test_tiny_segments_cost_little(split: SplitTopology, split_gateway: StartGateway) -> None:
    """Through the gateway to an echo server: a client announcing an MSS of 1 still gets
    segments of 536 bytes; 20,000 one-byte segments out of order, then 5,000 duplicates of the
    last, stay within lwIP's 256-pbuf out-of-order bound (the gateway's CPU time and memory
    growth are printed), and the data sent in order afterwards comes back exactly."""
    start_script_server(split.srv, "echo", ECHO_PORT)
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--no-offload")
    pid = gw.proc.pid
    figures: dict[str, float] = {}

    async def scenario(wire: PacketWire) -> None:
        small = TcpPeer(wire, RAW_CLIENT4, 42000, SRV_ADDR4, ECHO_PORT, mss=1,
                        timeout=PEER_TIMEOUT)  # fmt: skip
        await small.connect()
        await small.send(b"m" * 3000)
        assert await small.recv_exactly(3000) == b"m" * 3000
        sizes = [len(s.payload) for s in small.segments if s.payload]
        assert max(sizes) == 536, sizes

        peer = TcpPeer(wire, RAW_CLIENT6, 42001, SRV_ADDR6, ECHO_PORT, mss=1220,
                       timeout=PEER_TIMEOUT)  # fmt: skip
        await peer.connect()
        data = pattern(7, 40_002)
        base = peer.seq
        cpu, rss = cpu_seconds(pid), rss_kib(pid)
        started = time.monotonic()
        for i in range(20_000):
            offset = 1 + 2 * i
            wire.send(tcp_packet(RAW_CLIENT6, SRV_ADDR6, 42001, ECHO_PORT, seq=base + offset,
                                 ack=peer.ack, flags=ACK,
                                 payload=data[offset : offset + 1]))  # fmt: skip
            if i % 1000 == 999:
                await trio.lowlevel.checkpoint()  # the wire reads the duplicate ACKs
        tail = tcp_packet(RAW_CLIENT6, SRV_ADDR6, 42001, ECHO_PORT, seq=base + 39_999,
                          ack=peer.ack, flags=ACK, payload=data[39_999:40_000])  # fmt: skip
        for i in range(5_000):
            wire.send(tail)
            if i % 1000 == 999:
                await trio.lowlevel.checkpoint()
        await peer.send(data)
        assert await peer.recv_exactly(len(data)) == data
        figures["seconds"] = time.monotonic() - started
        figures["gateway_cpu_seconds"] = cpu_seconds(pid) - cpu
        figures["rss_growth_kib"] = rss_kib(pid) - rss

    with RawTun(split.cli, gw.iface) as raw:
        run_peer(raw, scenario)
    print(f"25,000 one-byte segments then 40 KB in order: {figures}")
    assert_alive_and_forwarding(split, gw)


def test_a_syn_flood_keeps_half_open_connections_bounded(
    split: SplitTopology, split_gateway: StartGateway, tmp_path: Path
) -> None:
    """With dial-before-accept off every SYN becomes an lwIP connection in SYN_RCVD at once:
    3,000 spoofed SYNs leave at most ``tcp.max_half_open`` (64 here) of them, the oldest reset
    as newer ones arrive, and a real client connects and transfers byte-exact meanwhile."""
    start_script_server(split.srv, "digest", DIGEST_PORT)
    config = tmp_path / "gw.toml"
    config.write_text("[tcp]\nmax_half_open = 64\n")
    gw = split_gateway("--no-offload", "--no-dial-before-accept", "--config", str(config))
    with RawTun(split.cli, gw.iface) as raw:
        for i in range(3000):
            raw.inject_packet(tcp_packet(RAW_CLIENT4, SRV_ADDR4, 10_000 + i, DIGEST_PORT,
                                         seq=i * 7919, flags=SYN,
                                         options=tcp_options(mss=1460)))  # fmt: skip
        deadline = time.monotonic() + 20
        while counters(gw)["tcp_half_open_evicted"] < 3000 - 64 and time.monotonic() < deadline:
            time.sleep(0.2)
        found = counters(gw)
        print(f"half open {found['tcp_half_open']}, evicted {found['tcp_half_open_evicted']}")
        assert found["tcp_half_open"] <= 64
        assert found["tcp_half_open_evicted"] >= 3000 - 64
        assert_alive_and_forwarding(split, gw)
