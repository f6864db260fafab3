"""Plain UDP queries forwarded without a task (``dns.fast_forward``), through the gateway on the
in-memory device, to small DNS servers on loopback (dnsservers.py).

Why: the task-less path re-implements the failover rules with callbacks and one deadline
task, so each rule is checked here where it runs: a silent upstream costs one attempt and the
next one answers; silence everywhere gives SERVFAIL at the query's deadline after rounds of
attempts; a closed port or SERVFAIL moves on at once; answers with a wrong ID or question are
dropped and counted while the real one is taken; a truncated answer is asked again over TCP;
many queries in flight from several clients respect the shares. The namespace tests
(tests/integration/test_dns_upstream_netns.py) repeat the essentials with dig and unbound.
Timeouts are real but short, and bounds generous: trio's autojump clock would jump while the
kernel is still moving loopback packets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dns.message
import dns.rcode
import pytest
import trio

from tunlwip import MemoryDevice
from tunlwip.dns.proxy import DnsConfig
from tunlwip.gateway import Gateway, GatewayConfig

from dnsservers import HOST, UdpMode, UdpServer, addresses
from harness import on_loopback
from packets import udp_packet
from tcppeer import PacketWire

CLIENTS = ("198.18.0.2", "198.18.0.3", "198.18.0.4")
GW4 = "198.18.0.1"


class Env:
    def __init__(self, gateway: Gateway, device: MemoryDevice, wire: PacketWire) -> None:
        self.gateway, self.device, self.wire = gateway, device, wire

    @property
    def proxy(self) -> Any:
        assert self.gateway.dns is not None
        return self.gateway.dns

    def ask(self, name: str, *, client: str = CLIENTS[0], sport: int = 5353,
            qid: int = 1) -> None:  # fmt: skip
        query = dns.message.make_query(name, "A", use_edns=0)
        query.id = qid
        self.device.inject_packet(udp_packet(client, GW4, sport, 53, query.to_wire()))

    async def answers(self, count: int, within: float = 10) -> list[Any]:
        got: list[Any] = []
        with trio.fail_after(within):
            while len(got) < count:
                got.append(await self.wire.next_unmatched())
        return got

    def upstream_counters(self) -> dict[str, int]:
        return dict(self.proxy.upstreams.counters)

    def counters(self) -> Any:
        return self.gateway.statistics().dns


async def start(nursery: trio.Nursery, *urls: str, **dns_kw: Any) -> Env:
    config = GatewayConfig(dns=DnsConfig(upstreams=urls, **dns_kw))
    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config))
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return Env(gateway, device, wire)


async def server(nursery: trio.Nursery, mode: UdpMode, address: str = "192.0.2.1") -> UdpServer:
    udp = UdpServer(mode, address)
    await nursery.start(udp.run)
    return udp


def closed_port_url() -> str:
    """A loopback UDP port nobody listens on (the kernel answers port unreachable)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    return f"udp://{HOST}:{port}"


def reply(packet: Any) -> dns.message.Message:
    return dns.message.from_wire(packet.payload)


async def test_a_silent_upstream_costs_one_attempt_and_the_next_answers(
    nursery: trio.Nursery,
) -> None:
    silent = await server(nursery, "silent")
    good = await server(nursery, "answer", "192.0.2.2")
    env = await start(nursery, silent.url, good.url, attempt_timeout=0.3, query_timeout=5)
    started = trio.current_time()
    env.ask("www.test", qid=7)
    await trio.sleep(0.1)
    assert len(env.proxy._fast) == 1, "not forwarded by the task-less path"
    (packet,) = await env.answers(1)
    assert 0.3 <= trio.current_time() - started < 4
    answer = reply(packet)
    assert answer.id == 7 and [r.address for r in answer.answer[0]] == ["192.0.2.2"]
    assert silent.ids and good.ids  # both were asked
    counts = env.upstream_counters()
    assert (counts["queries"], counts["timeouts"], counts["failures"]) == (1, 1, 0)
    stats = env.counters()
    assert (stats.forwarded, stats.timeouts, stats.upstream_failures) == (1, 0, 0)
    assert len(env.proxy._fast) == 0 and env.proxy.in_flight == 0


async def test_silence_everywhere_gets_servfail_at_the_query_deadline(
    nursery: trio.Nursery,
) -> None:
    """Two silent upstreams, 0.2 s attempts, a 1 s query: the upstreams are asked round after
    round until the deadline, then the client gets SERVFAIL, counted as a timeout."""
    first = await server(nursery, "silent")
    second = await server(nursery, "silent")
    env = await start(nursery, first.url, second.url, attempt_timeout=0.2, query_timeout=1.0)
    started = trio.current_time()
    env.ask("www.test", qid=9)
    (packet,) = await env.answers(1)
    elapsed = trio.current_time() - started
    assert 0.9 <= elapsed < 5, f"SERVFAIL after {elapsed:.2f} s"
    answer = reply(packet)
    assert answer.id == 9 and answer.rcode() == dns.rcode.SERVFAIL
    assert len(first.ids) >= 2 and len(second.ids) >= 1, "not asked round after round"
    assert len(set(first.ids)) == len(first.ids), "an ID was reused"
    counts = env.upstream_counters()
    assert counts["queries"] >= 2 and counts["timeouts"] >= 3 and counts["all_failed"] >= 1
    stats = env.counters()
    assert (stats.timeouts, stats.upstream_failures, stats.forwarded) == (1, 1, 0)
    assert env.proxy.in_flight == 0
    await trio.sleep(0.3)  # no second answer, no late attempt
    assert not env.wire.unmatched_nowait()


async def test_a_closed_port_moves_on_at_once(nursery: trio.Nursery) -> None:
    good = await server(nursery, "answer", "192.0.2.3")
    env = await start(nursery, closed_port_url(), good.url, attempt_timeout=3, query_timeout=6)
    started = trio.current_time()
    env.ask("www.test")
    (packet,) = await env.answers(1)
    assert trio.current_time() - started < 2.5, "waited for the attempt timeout"
    assert [r.address for r in reply(packet).answer[0]] == ["192.0.2.3"]
    counts = env.upstream_counters()
    assert (counts["failures"], counts["timeouts"]) == (1, 0)


async def test_every_upstream_failing_at_once_gives_servfail_at_once(
    nursery: trio.Nursery,
) -> None:
    env = await start(nursery, closed_port_url(), attempt_timeout=3, query_timeout=6)
    started = trio.current_time()
    env.ask("www.test")
    (packet,) = await env.answers(1)
    assert trio.current_time() - started < 2.5, "failed fast upstreams were asked again"
    assert reply(packet).rcode() == dns.rcode.SERVFAIL
    stats = env.counters()
    assert (stats.upstream_failures, stats.timeouts) == (1, 0)
    assert env.upstream_counters()["all_failed"] == 1


@pytest.mark.parametrize("mode", ["servfail", "refused"])
async def test_servfail_or_refused_moves_on(nursery: trio.Nursery, mode: UdpMode) -> None:
    bad = await server(nursery, mode)
    good = await server(nursery, "answer", "192.0.2.4")
    env = await start(nursery, bad.url, good.url)
    env.ask("www.test")
    (packet,) = await env.answers(1)
    assert [r.address for r in reply(packet).answer[0]] == ["192.0.2.4"]
    assert bad.ids and env.upstream_counters()["bad_rcodes"] == 1


@pytest.mark.parametrize("mode", ["servfail", "refused"])
async def test_servfail_or_refused_alone_is_passed_on_as_it_is(
    nursery: trio.Nursery, mode: UdpMode
) -> None:
    bad = await server(nursery, mode)
    env = await start(nursery, bad.url)
    env.ask("www.test")
    (packet,) = await env.answers(1)
    expected = dns.rcode.SERVFAIL if mode == "servfail" else dns.rcode.REFUSED
    assert reply(packet).rcode() == expected
    assert env.upstream_counters()["bad_rcodes"] == 1
    assert len(bad.ids) == 1, "asked again"


async def test_wrong_id_or_question_is_dropped_and_counted_and_the_real_answer_taken(
    nursery: trio.Nursery,
) -> None:
    """The "noisy" server sends garbage and an answer under another ID before the real one."""
    noisy = await server(nursery, "noisy", "192.0.2.5")
    env = await start(nursery, noisy.url)
    for i in range(5):
        env.ask(f"n{i}.test", sport=7000 + i, qid=100 + i)
    packets = await env.answers(5)
    got = {reply(p).id: [r.address for r in reply(p).answer[0]] for p in packets}
    assert got == {100 + i: ["192.0.2.5"] for i in range(5)}
    counts = env.upstream_counters()
    assert counts["udp_ignored"] == 10, counts  # two per query
    assert env.counters().forwarded == 5


async def test_a_truncated_answer_is_asked_again_over_tcp(nursery: trio.Nursery) -> None:
    truncating = await server(nursery, "truncate", "192.0.2.6")
    env = await start(nursery, truncating.url)
    env.ask("www.test", qid=11)
    (packet,) = await env.answers(1)
    answer = reply(packet)
    assert answer.id == 11 and [r.address for r in answer.answer[0]] == ["192.0.2.6"]
    assert len(truncating.ids) == 1 and len(truncating.tcp_ids) == 1
    assert env.upstream_counters()["tcp_retries"] == 1


async def test_many_queries_in_flight_from_several_clients_keep_their_shares(
    nursery: trio.Nursery,
) -> None:
    """max_in_flight 8, 4 per client, a slow upstream (silent for 0.5 s attempts, then the
    next answers): the first client's 6 queries get 4 through and 2 REFUSED (client_share),
    a retransmission of one in flight is dropped (duplicates), the second client's 4 all go
    through, and the third client, with the table full, is REFUSED (overload). Every admitted
    query is then answered."""
    silent = await server(nursery, "silent")
    good = await server(nursery, "answer", "192.0.2.7")
    env = await start(nursery, silent.url, good.url, attempt_timeout=0.5, query_timeout=5,
                      max_in_flight=8, max_in_flight_per_client=4)  # fmt: skip
    for i in range(6):
        env.ask(f"a{i}.test", client=CLIENTS[0], sport=8000, qid=i + 1)
    env.ask("a0.test", client=CLIENTS[0], sport=8000, qid=1)  # a retransmission
    for i in range(4):
        env.ask(f"b{i}.test", client=CLIENTS[1], sport=9000 + i, qid=1)
    env.ask("c0.test", client=CLIENTS[2], sport=8000, qid=1)
    refused = await env.answers(3, within=0.4)  # at once, before any attempt times out
    assert sorted((p.dst, reply(p).id) for p in refused) == [
        (CLIENTS[0], 5), (CLIENTS[0], 6), (CLIENTS[2], 1)]  # fmt: skip
    assert all(reply(p).rcode() == dns.rcode.REFUSED for p in refused)
    assert env.proxy.in_flight == 8 and len(env.proxy._fast) == 8
    answered = await env.answers(8)
    assert sorted((p.dst, p.dport, reply(p).id) for p in answered) == sorted(
        [(CLIENTS[0], 8000, i + 1) for i in range(4)]
        + [(CLIENTS[1], 9000 + i, 1) for i in range(4)]
    )
    assert all(addresses(p.payload) == ["192.0.2.7"] for p in answered)
    stats = env.counters()
    assert (stats.client_share, stats.overload, stats.duplicates) == (2, 1, 1)
    assert (stats.forwarded, stats.queries) == (8, 12)
    assert env.proxy.in_flight == 0 and len(env.proxy.in_flight_per_client) == 0


async def test_a_reload_to_other_upstreams_reads_their_sockets_in_the_poll_set(
    nursery: trio.Nursery,
) -> None:
    first = await server(nursery, "answer", "192.0.2.8")
    second = await server(nursery, "answer", "192.0.2.9")
    env = await start(nursery, first.url)
    env.ask("one.test", sport=6100)
    (packet,) = await env.answers(1)
    assert addresses(packet.payload) == ["192.0.2.8"]
    config = env.gateway.config
    env.gateway.reconfigure(
        dataclasses.replace(config, dns=dataclasses.replace(config.dns, upstreams=(second.url,)))
    )
    (upstream,) = env.proxy.upstreams.upstreams
    assert upstream.pool.watcher is env.gateway.stack
    env.ask("two.test", sport=6101)
    (packet,) = await env.answers(1)
    assert addresses(packet.payload) == ["192.0.2.9"]
    (slot,) = upstream.pool._live
    assert upstream.pool.opened == 1 and slot.watcher is env.gateway.stack


async def test_sessions_the_proxy_does_not_take_get_a_task_and_the_same_answers(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The way without ``DnsProxy.run`` (``serve_udp``, a task per query) still answers."""
    silent = await server(nursery, "silent")
    good = await server(nursery, "answer", "192.0.2.10")
    env = await start(nursery, silent.url, good.url, attempt_timeout=0.3)
    monkeypatch.setattr(env.proxy, "attach_udp", lambda session: False)
    env.ask("www.test", qid=3)
    (packet,) = await env.answers(1)
    assert reply(packet).id == 3 and addresses(packet.payload) == ["192.0.2.10"]
    assert len(env.proxy._fast) == 0
    assert env.upstream_counters()["timeouts"] == 1
