"""DNS upstreams reached through a via (tunlwip.dns.upstream_via): which dialer a via gives, and
what a proxy that is down, hostile or silent costs a query, against small servers on loopback.

Why: a DNS route through a proxy must fail like any upstream when its proxy fails: fast when
the proxy refuses, within the attempt's time when it stalls, with a counted failure and a
SERVFAIL for that route's names only, never an exception that takes the proxy down, and never
an answer from another route's servers. (The real proxies, danted and tinyproxy, are in
tests/integration/test_dns_split_netns.py.)
"""

from __future__ import annotations

import dns.message
import dns.rcode
import pytest
import trio

from proxyservers import free_port
from tunlwip.config import DnsConfig
from tunlwip.config.dns_routes import DnsRoute
from tunlwip.dialer import Dialer, c_protection
from tunlwip.dns.proxy import DnsProxy
from tunlwip.dns.split import DEFAULT_ROUTE
from tunlwip.dns.upstream_via import ProxiedDialer, upstream_dialer
from tunlwip.dns.upstreams import UpstreamError, UpstreamSet, parse_upstream
from tunlwip.egress.via import Direct, HttpProxy, Reject, Socks5Proxy
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ConfigError

from dnsservers import HOST, UdpServer, make_query

CLIENT = Endpoint.parse("198.18.0.2", 5353)


def test_each_via_gives_its_dialer() -> None:
    dialer = Dialer()
    assert upstream_dialer(None, dialer) is dialer
    assert upstream_dialer(Direct(), dialer) is dialer
    marked = upstream_dialer(Direct(fwmark=7), dialer)
    assert isinstance(marked, Dialer) and c_protection(marked.protector) == ("fwmark", 7)
    bound = upstream_dialer(Direct(interface="eth9"), dialer)
    assert isinstance(bound, Dialer) and c_protection(bound.protector) == ("interface", "eth9")
    proxied = upstream_dialer(Socks5Proxy(HOST, 1080, "u", "secret"), dialer)
    assert isinstance(proxied, ProxiedDialer) and "secret" not in repr(proxied)
    assert isinstance(upstream_dialer(HttpProxy(HOST, 3128), dialer), ProxiedDialer)
    with pytest.raises(ValueError, match="reached directly or through a proxy"):
        upstream_dialer(Reject(), dialer)


def test_udp_upstreams_are_refused_through_a_proxy() -> None:
    with pytest.raises(ConfigError, match="udp://, which cannot go through the proxy"):
        parse_upstream("udp://127.0.0.1", Dialer(), via=Socks5Proxy(HOST, 1080))
    with pytest.raises(ConfigError, match="must be given by IP address"):
        parse_upstream("tcp://127.0.0.1", Dialer(), via=Socks5Proxy("proxy.test", 1080))
    upstream = parse_upstream("udp://127.0.0.1", Dialer(), via=Direct(fwmark=3))
    assert upstream.url == "udp://127.0.0.1"


async def upstream_through(via: Socks5Proxy | HttpProxy, attempt: float = 0.5) -> UpstreamSet:
    # The upstream's own address does not matter: the proxy never gets that far.
    upstream = parse_upstream("tcp://127.0.0.1:1", Dialer(), via=via)
    return UpstreamSet([upstream], attempt_timeout=attempt)


async def test_a_proxy_that_is_down_fails_the_query_at_once() -> None:
    upstreams = await upstream_through(Socks5Proxy(HOST, free_port()))
    started = trio.current_time()
    with pytest.raises(UpstreamError, match="proxy: refused"):
        await upstreams.resolve(make_query())
    assert trio.current_time() - started < 0.4
    assert upstreams.counters["failures"] == 1 and upstreams.counters["timeouts"] == 0


async def hostile_proxy(nursery: trio.Nursery, reply: bytes | None) -> int:
    """A TCP server that answers whatever it is sent with ``reply`` (None: nothing, ever)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            if reply is None:
                await trio.sleep_forever()
            await stream.send_all(reply)
            await trio.sleep(1)

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return int(listeners[0].socket.getsockname()[1])


@pytest.mark.parametrize(
    ("scheme", "reply", "reason"),
    [
        ("socks5", b"HTTP/1.1 400 Bad Request\r\n\r\n", "proxy: bad version"),
        ("socks5", b"\x05\xff", "proxy: no acceptable auth method"),
        ("socks5", b"\x05\x00\x05\x01\x00\x01" + bytes(6), "proxy: general failure"),
        ("http", b"HTTP/1.1 403 Forbidden\r\n\r\n", "proxy: forbidden by proxy"),
        ("http", b"\x05\x00garbage\r\n\r\n", "proxy: bad response"),
    ],
)
async def test_a_hostile_proxy_is_the_upstreams_failure(
    nursery: trio.Nursery, scheme: str, reply: bytes, reason: str
) -> None:
    port = await hostile_proxy(nursery, reply)
    via = Socks5Proxy(HOST, port) if scheme == "socks5" else HttpProxy(HOST, port)
    upstreams = await upstream_through(via)
    with trio.fail_after(2), pytest.raises(UpstreamError, match=reason):
        await upstreams.resolve(make_query())
    assert upstreams.counters["failures"] == 1


async def test_a_silent_proxy_costs_one_attempt_and_the_route_gets_servfail(
    nursery: trio.Nursery,
) -> None:
    """Through the proxy: a proxy that never answers its greeting holds the query only until
    the deadline; the name's route answers SERVFAIL, the default upstream is never asked, and
    other names are answered meanwhile."""
    port = await hostile_proxy(nursery, None)
    default = UdpServer("answer", "192.0.2.1")
    await nursery.start(default.run)
    route = DnsRoute(name="corp", domains=("*.corp.test",), upstreams=("tcp://127.0.0.1:1",),
                     via=Socks5Proxy(HOST, port))  # fmt: skip
    config = DnsConfig(upstreams=(default.url,), routes=(route,), query_timeout=0.6,
                       attempt_timeout=0.3)  # fmt: skip
    proxy = DnsProxy(config, Dialer())
    try:
        with trio.fail_after(3):
            other = await proxy.answer(make_query("www.test"), CLIENT, max_udp_size=True)
            started = trio.current_time()
            wire = await proxy.answer(make_query("a.corp.test", 9), CLIENT, max_udp_size=True)
        assert other is not None and dns.message.from_wire(other).answer
        assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.SERVFAIL
        assert 0.6 <= trio.current_time() - started < 1.5
        assert len(default.ids) == 1  # www.test only: a.corp.test never leaked
        stats = proxy.split.statistics()
        assert stats.failures == {"corp": 1, DEFAULT_ROUTE: 0}
        assert stats.via["corp"] == f"socks5://{HOST}:{port}"
        assert proxy.split.routes[0].upstreams.counters["timeouts"] >= 1
    finally:
        await proxy.aclose()


async def test_a_route_whose_proxy_is_down_answers_servfail_at_once_and_counts_it(
    nursery: trio.Nursery,
) -> None:
    default = UdpServer("answer", "192.0.2.1")
    await nursery.start(default.run)
    via = Socks5Proxy(HOST, free_port())
    route = DnsRoute(name="corp", domains=("*.corp.test",),
                     upstreams=("tcp://127.0.0.1:1", "tls://127.0.0.1:2"), via=via)  # fmt: skip
    proxy = DnsProxy(DnsConfig(upstreams=(default.url,), routes=(route,)), Dialer())
    try:
        started = trio.current_time()
        with trio.fail_after(2):
            wire = await proxy.answer(make_query("a.corp.test"), CLIENT, max_udp_size=True)
        assert trio.current_time() - started < 0.5
        assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.SERVFAIL
        stats = proxy.split.statistics()
        assert stats.proxy_failures == {"corp": 2, DEFAULT_ROUTE: 0}  # one per upstream
        assert stats.failures == {"corp": 1, DEFAULT_ROUTE: 0}
        assert default.ids == []
    finally:
        await proxy.aclose()
