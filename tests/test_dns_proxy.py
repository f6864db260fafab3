"""The DNS proxy inside the gateway, on the in-memory device, with an upstream on loopback.

Why: interception (which port-53 flows the proxy takes), matching of answers to clients,
timeouts, truncation and TCP pipelining are packet-level behaviour that must be exact; the
namespace tests (tests/integration/test_dns*_netns.py) repeat the essentials with dig and
unbound. The upstream here is a small dnspython server on 127.0.0.1 that counts its queries.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunlwip import MemoryDevice
from tunlwip.dns.proxy import DnsConfig, resolv_conf_upstreams
from tunlwip.endpoint import Endpoint
from tunlwip.gateway import Gateway, GatewayConfig
from tunlwip.udp import UdpSession

from harness import on_loopback
from packets import udp_packet
from tcppeer import PacketWire, TcpPeer

CLIENT4, CLIENT6 = "198.18.0.2", "fd00:18::2"
GW4, GW6 = "198.18.0.1", "fd00:18::1"
ZONE = {"www.test.": "198.18.5.5", "other.test.": "198.18.5.6", "ads.test.": "198.18.5.7"}
BIG = "big.test."  # 200 A records: about 3.2 KB
SLOW = "slow.test."  # never answered
CLOAKED = "cloaked.test."  # CNAME x.tracker.test. (a tracker behind an innocent name)


class Upstream:
    """A loopback DNS server (UDP and TCP on one port) that counts the questions it gets."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.port = 0

    def respond(self, wire: bytes, udp: bool = True) -> bytes | None:
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text()
        self.asked.append(name)
        if name == SLOW:
            return None
        response = dns.message.make_response(query)
        if name == CLOAKED:
            response.answer.append(
                dns.rrset.from_text(CLOAKED, 300, "IN", "CNAME", "x.tracker.test.")
            )
            response.answer.append(
                dns.rrset.from_text("x.tracker.test.", 300, "IN", "A", "198.18.5.9")
            )
        elif name == BIG:
            addresses = [f"198.18.{i // 250}.{i % 250}" for i in range(200)]
            response.answer.append(dns.rrset.from_text(BIG, 300, "IN", "A", *addresses))
        elif name in ZONE and query.question[0].rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(name, 300, "IN", "A", ZONE[name]))
        elif name not in ZONE:
            response.set_rcode(dns.rcode.NXDOMAIN)
        try:
            return response.to_wire(max_size=0 if udp else 65535)
        except dns.exception.TooBig:  # as a real server: too big for UDP -> empty with TC
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC
            return truncated.to_wire()

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        for _ in range(20):  # a free TCP port whose UDP twin is free too
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            try:
                await udp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                udp.close()
                for listener in listeners:
                    await listener.aclose()
        else:
            raise RuntimeError("no free port pair")

        async def serve_udp() -> None:
            while True:
                data, addr = await udp.recvfrom(65535)
                answer = self.respond(data)
                if answer is not None:
                    await udp.sendto(answer, addr)

        async def serve_tcp(stream: trio.SocketStream) -> None:
            buf = b""
            while data := await stream.receive_some():
                buf += data
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    answer = self.respond(buf[2 : 2 + n], udp=False)
                    buf = buf[2 + n :]
                    if answer is not None:
                        await stream.send_all(struct.pack("!H", len(answer)) + answer)

        with udp:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_udp)
                nursery.start_soon(trio.serve_listeners, serve_tcp, listeners)
                task_status.started(self.port)


class Env:
    def __init__(self, gateway: Gateway, device: MemoryDevice, wire: PacketWire) -> None:
        self.gateway, self.device, self.wire = gateway, device, wire

    def ask(self, name: str, *, client: str = CLIENT4, server: str = GW4, sport: int = 5353,
            qid: int = 1, rdtype: str = "A", edns: int = -1) -> None:  # fmt: skip
        query = dns.message.make_query(name, rdtype, use_edns=edns)
        query.id = qid
        self.device.inject_packet(udp_packet(client, server, sport, 53, query.to_wire()))

    async def answers(self, count: int) -> list[Any]:
        got: list[Any] = []
        with trio.fail_after(30):
            while len(got) < count:
                got.append(await self.wire.next_unmatched())
        return got


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    server = Upstream()
    await nursery.start(server.serve)
    return server


async def start(nursery: trio.Nursery, upstream: Upstream, **dns_kw: Any) -> Env:
    dns_kw.setdefault("upstreams", (f"udp://127.0.0.1:{upstream.port}",))
    config = GatewayConfig(dns=DnsConfig(**dns_kw))
    device = MemoryDevice()
    forwarded: list[UdpSession] = []

    async def handler(session: UdpSession) -> None:  # what is not the proxy's
        forwarded.append(session)

    gateway = Gateway(device, on_loopback(config), udp_handler=handler)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    env = Env(gateway, device, wire)
    env.forwarded = forwarded  # type: ignore[attr-defined]
    return env


def message(packet: Any) -> dns.message.Message:
    return dns.message.from_wire(packet.payload)


@pytest.mark.parametrize(("client", "server"), [(CLIENT4, GW4), (CLIENT6, GW6)])
async def test_query_to_the_gateway_is_answered_from_it(
    nursery: trio.Nursery, upstream: Upstream, client: str, server: str
) -> None:
    env = await start(nursery, upstream)
    env.ask("www.test", client=client, server=server, qid=77)
    (reply,) = await env.answers(1)
    assert (reply.src, reply.sport, reply.dst, reply.dport) == (server, 53, client, 5353)
    answer = message(reply)
    assert answer.id == 77 and answer.rcode() == dns.rcode.NOERROR
    assert [r.address for r in answer.answer[0]] == ["198.18.5.5"]
    assert env.gateway.statistics().dns.forwarded == 1  # type: ignore[union-attr]


async def test_hijack_all_answers_any_address_and_gateway_mode_forwards_it(
    nursery: trio.Nursery, upstream: Upstream
) -> None:
    env = await start(nursery, upstream)
    env.ask("www.test", server="203.0.113.53")
    (reply,) = await env.answers(1)
    assert reply.src == "203.0.113.53" and message(reply).answer


async def test_hijack_gateway_leaves_other_resolvers_alone(
    nursery: trio.Nursery, upstream: Upstream
) -> None:
    env = await start(nursery, upstream, hijack="gateway")
    env.ask("www.test", server="203.0.113.53")
    env.ask("www.test", server=GW4, sport=5354)
    (reply,) = await env.answers(1)
    assert reply.src == GW4
    assert [s.target.port for s in env.forwarded] == [53]  # type: ignore[attr-defined]


async def test_blocked_names_never_reach_the_upstream(
    nursery: trio.Nursery, upstream: Upstream, tmp_path: Path
) -> None:
    (tmp_path / "block").write_text("*.ads.test\n0.0.0.0 tracker.test\n")
    (tmp_path / "allow").write_text("ok.ads.test\n")
    env = await start(nursery, upstream, block_files=(str(tmp_path / "block"),),
                      allow_files=(str(tmp_path / "allow"),))  # fmt: skip
    for i, name in enumerate(["ads.test", "x.ads.test", "tracker.test", "ok.ads.test"]):
        env.ask(name, sport=6000 + i)
    replies = {r.dport: message(r) for r in await env.answers(4)}
    assert [replies[6000 + i].rcode() for i in range(3)] == [dns.rcode.NXDOMAIN] * 3
    assert replies[6003].rcode() == dns.rcode.NXDOMAIN  # not in ZONE: the upstream said so
    assert upstream.asked == ["ok.ads.test."]
    assert env.gateway.statistics().dns.blocked == 3  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["nxdomain", "null"])
async def test_cname_to_a_blocked_name_gets_the_blocked_answer_cached_or_not(
    nursery: trio.Nursery, upstream: Upstream, tmp_path: Path, how: str
) -> None:
    """The question is not blocked, so it is asked; its answer's CNAME points at a blocked
    name, so the client gets what the blocked name would get, from the cache as well; after a
    reload that drops the rule, the cached answer is served whole."""
    (tmp_path / "block").write_text("||tracker.test^\n")
    env = await start(nursery, upstream, block_files=(str(tmp_path / "block"),),
                      blocked_answer=how)  # fmt: skip
    for sport, name in ((6000, "cloaked.test"), (6001, "CLOAKED.test")):  # 2nd: not replayed
        env.ask(name, sport=sport)
        answer = message((await env.answers(1))[0])
        if how == "nxdomain":
            assert answer.rcode() == dns.rcode.NXDOMAIN and not answer.answer
        else:
            assert [rd.to_text() for rrset in answer.answer for rd in rrset] == ["0.0.0.0"]
    assert upstream.asked == [CLOAKED]
    stats = env.gateway.statistics().dns
    assert stats is not None and (stats.blocked, stats.blocked_cname, stats.cache_hits) == (2, 2, 1)
    (tmp_path / "block").write_text("")
    assert env.gateway.dns is not None
    env.gateway.dns.reload()
    env.ask("cloaked.test", sport=6002)
    answer = message((await env.answers(1))[0])
    assert [rrset.rdtype for rrset in answer.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]


async def test_second_query_comes_from_the_cache(nursery: trio.Nursery, upstream: Upstream) -> None:
    env = await start(nursery, upstream)
    env.ask("www.test", qid=1)
    await env.answers(1)
    env.ask("WWW.test", qid=2, sport=5354)
    (reply,) = await env.answers(1)
    assert message(reply).id == 2 and message(reply).answer
    assert upstream.asked == ["www.test."]


async def test_repeated_query_is_replayed_for_a_second_then_aged_from_the_cache(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(nursery, upstream)
    env.ask("www.test", qid=1)
    first = message((await env.answers(1))[0])
    env.ask("www.test", qid=2)  # byte-identical but for the ID: replayed, not parsed
    replayed = message((await env.answers(1))[0])
    assert replayed.id == 2 and replayed.answer == first.answer
    assert replayed.answer[0].ttl == first.answer[0].ttl == 300
    stats = env.gateway.statistics().dns
    assert stats is not None and (stats.replayed, stats.cache_hits, stats.queries) == (1, 0, 2)
    await trio.sleep(3)
    env.ask("www.test", qid=3)  # past the replay window: the cache answers, TTL aged
    aged = message((await env.answers(1))[0])
    assert aged.id == 3 and aged.answer[0].ttl == 297
    assert upstream.asked == ["www.test."]
    assert env.gateway.dns is not None
    client, server = Endpoint.parse(CLIENT4, 5353), Endpoint.parse("198.18.5.5", 443)
    assert env.gateway.dns.name_for(client, server) == "www.test"


async def test_failures_and_truncated_answers_are_not_replayed(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(nursery, upstream, query_timeout=2.0, attempt_timeout=2.0)
    for qid in (1, 2):
        env.ask("slow.test", qid=qid)
        assert message((await env.answers(1))[0]).rcode() == dns.rcode.SERVFAIL
        env.ask("big.test", qid=qid, sport=5400)
        assert message((await env.answers(1))[0]).flags & dns.flags.TC
    stats = env.gateway.statistics().dns
    assert stats is not None and stats.replayed == 0 and stats.truncated == 2


async def test_silent_upstream_gives_servfail_at_the_timeout_and_blocks_nobody(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(nursery, upstream, query_timeout=5.0, attempt_timeout=5.0)
    t0 = trio.current_time()
    env.ask("slow.test", sport=7000)
    await trio.sleep(1)
    env.ask("www.test", sport=7001)
    first, second = await env.answers(2)
    assert first.dport == 7001 and message(first).answer  # not stuck behind slow.test
    assert second.dport == 7000 and message(second).rcode() == dns.rcode.SERVFAIL
    assert 5 <= trio.current_time() - t0 < 6
    assert env.gateway.statistics().dns.timeouts == 1  # type: ignore[union-attr]


async def test_retransmission_in_flight_is_dropped_but_same_id_from_another_client_is_not(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(nursery, upstream, query_timeout=5.0, attempt_timeout=5.0)
    env.ask("slow.test", sport=7000, qid=9)
    env.ask("slow.test", sport=7000, qid=9)  # the client retransmits
    env.ask("www.test", sport=7001, qid=9)  # another socket, same ID
    replies = await env.answers(2)
    assert sorted((r.dport, message(r).rcode()) for r in replies) == [
        (7000, dns.rcode.SERVFAIL), (7001, dns.rcode.NOERROR)]  # fmt: skip
    await trio.sleep(10)
    assert env.wire.unmatched_nowait() == []
    assert env.gateway.statistics().dns.duplicates == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(("edns", "truncated"), [(-1, True), (0, False)])
async def test_big_udp_answers_are_truncated_to_the_client_buffer(
    nursery: trio.Nursery, upstream: Upstream, edns: int, truncated: bool
) -> None:
    env = await start(nursery, upstream)
    env.ask("big.test", edns=edns)  # dnspython's EDNS default payload is 1232 bytes
    replies = await env.answers(1)
    answer = message(replies[0]) if len(replies) == 1 and not replies[0].more_fragments else None
    if truncated:
        assert answer is not None and answer.flags & dns.flags.TC and not answer.answer
    else:  # 1232-byte buffer: still too small for 3.2 KB, truncated as well
        assert answer is not None and answer.flags & dns.flags.TC
        assert len(replies[0].payload) <= 1232


async def test_tcp_queries_are_pipelined_and_answered_as_they_complete(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start(nursery, upstream, query_timeout=3.0, attempt_timeout=3.0)
    peer = TcpPeer(env.wire, CLIENT4, 40053, "203.0.113.53", 53)
    await peer.connect()
    wires = []
    for qid, name in ((1, "slow.test"), (2, "big.test"), (3, "www.test")):
        q = dns.message.make_query(name, "A")
        q.id = qid
        wires.append(struct.pack("!H", len(q.to_wire())) + q.to_wire())
    await peer.send(b"".join(wires))
    got = []
    for _ in range(3):
        (n,) = struct.unpack("!H", await peer.recv_exactly(2))
        got.append(dns.message.from_wire(await peer.recv_exactly(n)))
    assert [m.id for m in got][-1] == 1  # the slow one last, as SERVFAIL
    assert got[-1].rcode() == dns.rcode.SERVFAIL
    big = next(m for m in got if m.id == 2)
    assert not big.flags & dns.flags.TC and len(big.answer[0]) == 200


def tcp_query(name: str, qid: int) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    return struct.pack("!H", len(q.to_wire())) + q.to_wire()


async def test_tcp_client_trickling_a_query_is_reset_at_the_query_deadline(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """One byte every 9 s never trips the 30 s idle timeout; the query deadline (10 s from
    its first byte) resets the connection, and another connection is answered meanwhile."""
    env = await start(nursery, upstream, tcp_query_timeout=10.0)
    slow = TcpPeer(env.wire, CLIENT4, 40053, GW4, 53)
    await slow.connect()
    t0 = trio.current_time()
    wire = tcp_query("www.test", 1)

    async def one_byte_every_9_s() -> None:
        for byte in wire:
            await slow.send(bytes([byte]))
            await trio.sleep(9)

    with pytest.raises(ConnectionResetError):
        await one_byte_every_9_s()
    assert slow.reset_received and 10 <= trio.current_time() - t0 < 19
    other = TcpPeer(env.wire, CLIENT4, 40054, GW4, 53)
    await other.connect()
    await other.send(tcp_query("other.test", 2))
    (n,) = struct.unpack("!H", await other.recv_exactly(2))
    assert dns.message.from_wire(await other.recv_exactly(n)).answer
    stats = env.gateway.statistics().dns
    assert stats is not None and stats.tcp_timeouts == 1 and upstream.asked == ["other.test."]


async def test_tcp_queries_one_after_another_each_get_the_whole_deadline(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """The deadline is per query, not per connection: a client asking every 6 s, each query
    sent in two halves 3 s apart, keeps its connection for a minute."""
    env = await start(nursery, upstream, tcp_query_timeout=5.0)
    peer = TcpPeer(env.wire, CLIENT4, 40055, GW4, 53)
    await peer.connect()
    for qid in range(10):
        wire = tcp_query("www.test", qid)
        await peer.send(wire[:5])
        await trio.sleep(3)
        await peer.send(wire[5:])
        (n,) = struct.unpack("!H", await peer.recv_exactly(2))
        assert dns.message.from_wire(await peer.recv_exactly(n)).id == qid
        await trio.sleep(3)
    assert env.gateway.statistics().dns.tcp_timeouts == 0  # type: ignore[union-attr]


async def test_tcp_client_that_never_reads_its_answers_is_reset(
    nursery: trio.Nursery, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """120 pipelined 3.2 KB answers to a client whose window stays shut (it never reads):
    lwIP's 256 KiB send buffer takes the first ones, then an answer cannot be written, and the
    connection is reset once it has waited the query deadline rather than held forever."""
    env = await start(nursery, upstream, tcp_query_timeout=10.0)
    peer = TcpPeer(env.wire, CLIENT4, 40056, GW4, 53, window=512, wscale=None)
    await peer.connect()
    t0 = trio.current_time()
    await peer.send(b"".join(tcp_query("big.test", qid) for qid in range(120)))
    with trio.fail_after(60):
        while not peer.reset_received:  # noqa: ASYNC110 (polls the peer, as a client would)
            await trio.sleep(1)
    assert 10 <= trio.current_time() - t0 < 20
    assert env.gateway.statistics().dns.tcp_timeouts == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("client", "server"), [(CLIENT4, "203.0.113.53"), (CLIENT6, "2001:db8::53")]
)
async def test_reject_encrypted_refuses_port_853_as_a_closed_port_would(
    nursery: trio.Nursery, upstream: Upstream, client: str, server: str
) -> None:
    """``reject_encrypted``: a SYN to port 853 (DoT) gets RST at once, a datagram to it (DoQ)
    ICMP port unreachable quoting it; both counted, neither dialed nor made a session."""
    env = await start(nursery, upstream, reject_encrypted=True)
    peer = TcpPeer(env.wire, client, 40853, server, 853)
    with trio.fail_after(5), pytest.raises(ConnectionRefusedError):
        await peer.connect()
    env.device.inject_packet(udp_packet(client, server, 5853, 853, b"\x00\x01quic"))
    with trio.fail_after(5):
        reply = await env.wire.next_unmatched()
    assert (reply.icmp_type, reply.icmp_code) == ((3, 3) if ":" not in client else (1, 4))
    assert (reply.src, reply.dst) == (server, client) and reply.l4_checksum_ok
    stats = env.gateway.statistics()
    assert stats.refused.encrypted_dns == 2 and stats.udp.opened == 0
    assert env.forwarded == []  # type: ignore[attr-defined]


async def test_reject_encrypted_blocks_doh_resolver_names_and_the_firefox_canary(
    nursery: trio.Nursery, upstream: Upstream
) -> None:
    env = await start(nursery, upstream, reject_encrypted=True)
    names = ["use-application-dns.net", "dns.google", "mozilla.cloudflare-dns.com", "www.test"]
    for i, name in enumerate(names):
        env.ask(name, sport=6100 + i)
    replies = {r.dport: message(r) for r in await env.answers(len(names))}
    assert [replies[6100 + i].rcode() for i in range(3)] == [dns.rcode.NXDOMAIN] * 3
    assert replies[6103].answer and upstream.asked == ["www.test."]


async def test_policy_reload_applies_to_new_queries(
    nursery: trio.Nursery, upstream: Upstream, tmp_path: Path
) -> None:
    block = tmp_path / "block"
    block.write_text("")
    env = await start(nursery, upstream, block_files=(str(block),))
    env.ask("other.test", sport=1)
    assert message((await env.answers(1))[0]).answer
    block.write_text("other.test\n")
    assert env.gateway.dns is not None
    env.gateway.dns.reload()
    env.ask("other.test", sport=2, qid=2)  # the same bytes but the ID: no stale replay either
    assert message((await env.answers(1))[0]).rcode() == dns.rcode.NXDOMAIN


def test_resolv_conf_upstreams(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch lan\n"
                    "nameserver bogus\n")  # fmt: skip
    assert resolv_conf_upstreams(str(conf)) == ("udp://192.0.2.53:53", "udp://[fe80::1]:53")
    assert resolv_conf_upstreams(str(tmp_path / "missing")) == ()


# -- malformed queries -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=10))
def test_malformed_queries_get_formerr_or_are_dropped(payloads: list[bytes]) -> None:
    async def main() -> None:
        upstream = Upstream()
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.serve)
            env = await start(nursery, upstream, query_timeout=1.0)
            for i, payload in enumerate(payloads):
                env.device.inject_packet(udp_packet(CLIENT4, GW4, 1000 + i, 53, payload))
            with trio.move_on_after(3):
                await trio.sleep_forever()
            for reply in env.wire.unmatched_nowait():
                assert reply.src == GW4 and len(reply.payload) >= 12
                assert reply.payload[2] & 0x80  # a response, never an echo of a query
            stats = env.gateway.statistics().dns
            assert stats is not None and stats.queries == len(payloads)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_compression_loop_and_lying_counts_get_formerr(
    nursery: trio.Nursery, upstream: Upstream
) -> None:
    env = await start(nursery, upstream)
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    loop = header + b"\xc0\x0c" + struct.pack("!HH", 1, 1)  # the name points at itself
    lying = struct.pack("!HHHHHH", 0x4321, 0x0100, 5, 0, 0, 0) + b"\x03www\x00\x00\x01\x00\x01"
    env.device.inject_packet(udp_packet(CLIENT4, GW4, 1, 53, loop))
    env.device.inject_packet(udp_packet(CLIENT4, GW4, 2, 53, lying))
    replies = {r.dport: r.payload for r in await env.answers(2)}
    assert replies[1][:2] == b"\x12\x34" and replies[1][3] & 0x0F == dns.rcode.FORMERR
    assert replies[2][:2] == b"\x43\x21" and replies[2][3] & 0x0F == dns.rcode.FORMERR
    assert upstream.asked == []


async def test_plain_and_unusual_queries_get_the_answers_they_always_got(
    nursery: trio.Nursery, upstream: Upstream
) -> None:
    """Plain queries are read from their bytes, others parsed whole (``summary``): either way
    the same answers, names remembered for flows, and no cached answer for an ECS query."""
    import dns.edns

    from tunlwip.endpoint import Endpoint as Ep

    env = await start(nursery, upstream)
    env.ask("www.test", qid=1, edns=0)
    (reply,) = await env.answers(1)
    answer = message(reply)
    assert answer.id == 1 and answer.question[0].name.to_text() == "www.test."
    assert [rd.to_text() for rrset in answer.answer for rd in rrset] == [ZONE["www.test."]]
    dns_proxy = env.gateway.dns
    assert dns_proxy is not None
    client, address = Ep.parse(CLIENT4, 5353), Ep.parse(ZONE["www.test."], 443)
    assert dns_proxy.name_for(client, address) == "www.test"

    odd = dns.message.make_query("we\\032ird.test.", "A")  # not plain: parsed whole
    odd.id = 2
    junk = dns.message.make_query("other.test.", "A")  # bytes after the last record: FORMERR
    junk.id = 3
    for sport, wire in ((1002, odd.to_wire()), (1003, junk.to_wire() + b"\x00")):
        env.device.inject_packet(udp_packet(CLIENT4, GW4, sport, 53, wire))
    replies = {r.dport: message(r) for r in await env.answers(2)}
    assert replies[1002].rcode() == dns.rcode.NXDOMAIN
    assert replies[1003].rcode() == dns.rcode.FORMERR
    assert upstream.asked == ["www.test.", "we\\032ird.test."]

    for qid in (4, 5):  # an EDNS Client Subnet answer is never served from the cache
        subnet = dns.edns.ECSOption(f"198.18.{qid}.0", 24)  # (not the same bytes: no replay)
        ecs = dns.message.make_query("other.test.", "A", use_edns=0, options=[subnet])
        ecs.id = qid
        env.device.inject_packet(udp_packet(CLIENT4, GW4, 1000 + qid, 53, ecs.to_wire()))
        (reply,) = await env.answers(1)
        assert message(reply).id == qid and message(reply).answer
    assert upstream.asked[-2:] == ["other.test.", "other.test."]
