"""DNS upstreams named by URL, and the plain UDP and TCP upstreams against small servers on
loopback (servers: dnsservers.py).

Why: every URL form must pick the right transport, port and names, and bad ones must be
refused with the URL in the message; over UDP the caller's ID is restored while each query
goes out with a fresh ID and port, stray datagrams are ignored and a truncated answer is asked
again over TCP; over TCP a connection is reused, replaced and closed when it should be.
Timeouts are real but short (tenths of a second): trio's autojump clock would jump while
the kernel is still moving loopback packets.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import pytest
import trio

from tunlwip.dialer import Dialer
from tunlwip.dns.upstreams import (
    HttpsUpstream,
    TcpUpstream,
    TlsUpstream,
    UdpUpstream,
    UpstreamError,
    UpstreamSet,
    parse_upstream,
)
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ConfigError

from dnsservers import CLIENT_ID, HOST, StreamServer, UdpServer, addresses, make_query, message_id

# -- UDP -----------------------------------------------------------------------------------


async def test_udp_restores_the_callers_id_and_asks_with_fresh_ids_and_ports(
    nursery: trio.Nursery,
) -> None:
    server = UdpServer()
    await nursery.start(server.run)
    upstream = parse_upstream(server.url, Dialer())
    assert isinstance(upstream, UdpUpstream)
    for _ in range(6):
        answer = await upstream.query(make_query())
        assert message_id(answer) == CLIENT_ID
        assert addresses(answer) == ["192.0.2.1"]
    assert len(server.ids) == 6
    assert len(set(server.ids)) > 1, "the same ID went upstream every time"
    assert len(set(server.source_ports)) > 1, "one socket was reused for every query"


async def test_udp_ignores_garbage_and_datagrams_with_the_wrong_id(nursery: trio.Nursery) -> None:
    server = UdpServer("noisy")
    await nursery.start(server.run)
    upstream = parse_upstream(server.url, Dialer())
    with trio.fail_after(2):
        answer = await upstream.query(make_query())
    assert addresses(answer) == ["192.0.2.1"]  # not 203.0.113.66 from the wrong-ID datagram


async def test_udp_truncated_answer_is_asked_again_over_tcp(nursery: trio.Nursery) -> None:
    server = UdpServer("truncate")
    await nursery.start(server.run)
    upstream_set = UpstreamSet([parse_upstream(server.url, Dialer())])
    with trio.fail_after(2):
        answer, used = await upstream_set.resolve(make_query())
    assert used.url == server.url
    assert message_id(answer) == CLIENT_ID
    assert not dns.message.from_wire(answer).flags & dns.flags.TC
    assert addresses(answer) == ["192.0.2.1"]
    assert len(server.ids) == len(server.tcp_ids) == 1
    assert upstream_set.counters["tcp_retries"] == 1
    await upstream_set.aclose()


async def test_udp_closed_port_fails_at_once() -> None:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
        await probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    upstream = parse_upstream(f"udp://{HOST}:{port}", Dialer())
    with trio.fail_after(2), pytest.raises(UpstreamError, match="ConnectionRefused"):
        await upstream.query(make_query())


async def test_malformed_query_is_an_upstream_error() -> None:
    upstream = parse_upstream("udp://127.0.0.1:9", Dialer())
    with pytest.raises(UpstreamError, match="malformed query"):
        await upstream.query(b"\x00\x01short")


# -- TCP -----------------------------------------------------------------------------------


async def test_tcp_reuses_one_connection_for_sequential_queries(nursery: trio.Nursery) -> None:
    server = StreamServer()
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, TcpUpstream)
    for name in ("a.test.", "b.test."):
        answer = await upstream.query(make_query(name))
        assert message_id(answer) == CLIENT_ID
        assert dns.message.from_wire(answer).question[0].name.to_text() == name
    assert server.connections == 1
    assert len(server.ids) == 2
    assert upstream.idle_connections == 1
    await upstream.aclose()
    assert upstream.idle_connections == 0
    with trio.fail_after(2):
        await server.closed.wait()


async def test_tcp_replaces_a_pooled_connection_the_server_closed(nursery: trio.Nursery) -> None:
    server = StreamServer("one_per_connection")
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    for _ in range(3):
        with trio.fail_after(2):
            assert addresses(await upstream.query(make_query())) == ["192.0.2.1"]
    assert server.connections == 3
    await upstream.aclose()


async def test_tcp_idle_connection_too_old_is_not_reused(nursery: trio.Nursery) -> None:
    server = StreamServer()
    await nursery.start(server.run)
    upstream = TcpUpstream("tcp://test", Dialer(), Endpoint.parse(HOST, server.port),
                           max_idle_age=0.1)  # fmt: skip
    await upstream.query(make_query())
    await trio.sleep(0.2)
    await upstream.query(make_query())
    assert server.connections == 2
    assert upstream.idle_connections == 1
    await upstream.aclose()


async def test_tcp_keeps_at_most_four_idle_connections(nursery: trio.Nursery) -> None:
    server = StreamServer("slow")
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, TcpUpstream)
    with trio.fail_after(2):
        async with trio.open_nursery() as queries:
            for _ in range(6):
                queries.start_soon(upstream.query, make_query())
    assert server.connections == 6
    assert upstream.idle_connections == 4
    await upstream.aclose()


async def test_tcp_cancelled_query_closes_its_connection(nursery: trio.Nursery) -> None:
    server = StreamServer("silent")
    await nursery.start(server.run)
    upstream = parse_upstream(f"tcp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, TcpUpstream)
    with trio.move_on_after(0.2) as scope:
        await upstream.query(make_query())
    assert scope.cancelled_caught
    with trio.fail_after(2):
        await server.closed.wait()  # the server saw the connection end
    assert upstream.idle_connections == 0


# -- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "endpoint", "detail"),
    [
        ("udp://192.0.2.1", UdpUpstream, "192.0.2.1:53", None),
        ("udp://[fd00:1::2]:5353", UdpUpstream, "[fd00:1::2]:5353", None),
        ("tcp://192.0.2.1:5300", TcpUpstream, "192.0.2.1:5300", None),
        ("tls://192.0.2.1#dns.example", TlsUpstream, "192.0.2.1:853", "dns.example"),
        ("tls://[2001:db8::1]", TlsUpstream, "[2001:db8::1]:853", "2001:db8::1"),
        ("https://dns.example#192.0.2.1", HttpsUpstream, "192.0.2.1:443",
         ("dns.example", "dns.example", "/dns-query")),
        ("https://192.0.2.1:8443/q?x=1", HttpsUpstream, "192.0.2.1:8443",
         ("192.0.2.1", "192.0.2.1:8443", "/q?x=1")),
        ("https://[2001:db8::1]/dns-query", HttpsUpstream, "[2001:db8::1]:443",
         ("2001:db8::1", "[2001:db8::1]", "/dns-query")),
    ],
)  # fmt: skip
def test_parse_upstream_forms(url: str, kind: type, endpoint: str, detail: object) -> None:
    upstream = parse_upstream(url, Dialer())
    assert isinstance(upstream, kind)
    assert upstream.url == url
    assert str(upstream.endpoint) == endpoint  # type: ignore[attr-defined]
    if isinstance(upstream, TlsUpstream):
        assert upstream.server_name == detail
    if isinstance(upstream, HttpsUpstream):
        assert (upstream.server_name, upstream.host_header, upstream.target) == detail


@pytest.mark.parametrize(
    "url",
    [
        "1.1.1.1",
        "dns://1.1.1.1",
        "udp://",
        "udp://dns.google",
        "udp://fd00::1",
        "udp://1.1.1.1:0",
        "udp://1.1.1.1:99999",
        "udp://1.1.1.1:x",
        "udp://user@1.1.1.1",
        "udp://1.1.1.1#name",
        "tcp://1.1.1.1/path",
        "tls://dns.example",
        "tls://1.1.1.1#bad_name!",
        "https://dns.example/dns-query",
        "https://dns.example#not-an-ip",
        "https://1.1.1.1#8.8.8.8",
        "https://dns.google/dns-query{?dns}",
        "https://dns.example/d\u00fcns#192.0.2.1",
    ],
)
def test_parse_upstream_rejects(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_upstream(url, Dialer())
    assert repr(url) in str(info.value)


def test_parse_upstream_rejects_a_missing_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CA file"):
        parse_upstream("tls://192.0.2.1", Dialer(), ca_file=str(tmp_path / "missing.pem"))
