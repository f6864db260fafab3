"""Split DNS in the proxy (tunlwip.dns.split): which upstreams a name goes to, against small UDP
servers on loopback (dnsservers.py) that answer different addresses for the same name.

Why: a DNS route decides which servers learn a name and whose answer the client gets. A split
name must get its route's answer and never reach the default upstreams, not even when its own
upstreams fail (SERVFAIL, counted for that route); the cache must never hand one route's answer
to a name of another; a reload must swap the routes whole and keep the counters by name.
Timeouts are real but short: trio's autojump clock would jump while the kernel still moves
loopback packets.
"""

from __future__ import annotations

import socket

import dns.message
import dns.name
import dns.rcode
import pytest
import trio

from tunlwip.config import DnsConfig
from tunlwip.config.dns_routes import DnsRoute
from tunlwip.dialer import SO_MARK, Dialer
from tunlwip.dns.proxy import DnsProxy
from tunlwip.dns.split import DEFAULT_ROUTE, SplitUpstreams
from tunlwip.dns.transports import UdpUpstream
from tunlwip.egress.via import Direct
from tunlwip.endpoint import Endpoint
from tunlwip.stats import status_lines

from dnsservers import UdpServer, addresses, make_query

CLIENT = Endpoint.parse("198.18.0.2", 5353)
DEFAULT_ADDR, CORP_ADDR, LAB_ADDR = "192.0.2.1", "192.0.2.2", "192.0.2.3"


def split_of(*routes: DnsRoute) -> SplitUpstreams:
    config = DnsConfig(upstreams=("udp://127.0.0.1:53",), routes=routes)
    return SplitUpstreams.from_config(config, Dialer(), config.upstreams)


def route(name: str | None, *domains: str) -> DnsRoute:
    return DnsRoute(name=name, domains=domains, upstreams=("tcp://127.0.0.1:53",))


def test_first_matching_route_wins_by_exact_name_or_suffix() -> None:
    split = split_of(route("exact", "a.corp.test"), route("corp", "*.corp.test", "||lab.test^"),
                     route(None, ".x.a.corp.test", "other.test"))  # fmt: skip
    picked = {name: split.pick(name).name for name in (
        "a.corp.test", "A.Corp.Test.", "b.corp.test", "corp.test", "x.a.corp.test",
        "deep.x.a.corp.test", "lab.test", "in.lab.test", "other.test", "sub.other.test",
        "corp.test.evil", "notcorp.test", "test", "")}  # fmt: skip
    assert picked == {
        "a.corp.test": "exact", "A.Corp.Test.": "exact", "b.corp.test": "corp",
        "corp.test": "corp",  # *.corp.test covers corp.test itself, as in the DNS lists
        "x.a.corp.test": "corp",  # route 1 is before route 2, whose suffix is longer
        "deep.x.a.corp.test": "corp", "lab.test": "corp", "in.lab.test": "corp",
        "other.test": "2", "sub.other.test": DEFAULT_ROUTE, "corp.test.evil": DEFAULT_ROUTE,
        "notcorp.test": DEFAULT_ROUTE, "test": DEFAULT_ROUTE, "": DEFAULT_ROUTE,
    }  # fmt: skip
    assert split.pick(dns.name.from_text("B.corp.TEST.")).name == "corp"
    assert len(split) == 3 and split_of().pick("a.corp.test").name == DEFAULT_ROUTE


async def serve(nursery: trio.Nursery, mode: str, address: str) -> UdpServer:
    server = UdpServer(mode, address)  # type: ignore[arg-type]
    await nursery.start(server.run)
    return server


async def ask(proxy: DnsProxy, name: str, qid: int = 0x1234) -> dns.message.Message:
    with trio.fail_after(5):
        wire = await proxy.answer(make_query(name, qid), CLIENT, max_udp_size=True)
    assert wire is not None
    return dns.message.from_wire(wire)


def dns_config(default: UdpServer, *routes: DnsRoute, **kw: float) -> DnsConfig:
    return DnsConfig(upstreams=(default.url,), routes=routes, **kw)  # type: ignore[arg-type]


async def test_split_names_get_their_routes_answer_others_the_default(
    nursery: trio.Nursery,
) -> None:
    default = await serve(nursery, "answer", DEFAULT_ADDR)
    corp = await serve(nursery, "answer", CORP_ADDR)
    proxy = DnsProxy(dns_config(default, DnsRoute(name="corp", domains=("*.corp.test",),
                                                  upstreams=(corp.url,))), Dialer())  # fmt: skip
    try:
        assert addresses((await ask(proxy, "www.corp.test")).to_wire()) == [CORP_ADDR]
        assert addresses((await ask(proxy, "www.test")).to_wire()) == [DEFAULT_ADDR]
        assert addresses((await ask(proxy, "www.corp.test", 2)).to_wire()) == [CORP_ADDR]
        assert (len(corp.ids), len(default.ids)) == (1, 1)  # the second came from the cache
        stats = proxy.split.statistics()
        assert stats.queries == {"corp": 2, DEFAULT_ROUTE: 1}
        assert stats.forwarded == {"corp": 1, DEFAULT_ROUTE: 1}
        assert stats.failures == {"corp": 0, DEFAULT_ROUTE: 0}
        assert stats.upstreams == {"corp": corp.url, DEFAULT_ROUTE: default.url}
        assert stats.via == {"corp": "direct", DEFAULT_ROUTE: "direct"}
    finally:
        await proxy.aclose()


@pytest.mark.parametrize("mode", ["silent", "servfail"])
async def test_a_failing_route_gives_servfail_and_never_asks_the_default(
    nursery: trio.Nursery, mode: str
) -> None:
    """No leak: when the split upstreams fail (silent until the query's deadline, or SERVFAIL),
    the default upstreams are not asked; other names still resolve meanwhile."""
    default = await serve(nursery, "answer", DEFAULT_ADDR)
    corp = await serve(nursery, mode, CORP_ADDR)
    config = dns_config(default, DnsRoute(name="corp", domains=("*.corp.test",),
                                          upstreams=(corp.url,)),
                        query_timeout=0.6, attempt_timeout=0.3)  # fmt: skip
    proxy = DnsProxy(config, Dialer())
    try:
        async with trio.open_nursery() as inner:
            inner.start_soon(ask, proxy, "www.test")
            started = trio.current_time()
            answer = await ask(proxy, "secret.corp.test", 7)
        assert answer.rcode() == dns.rcode.SERVFAIL and not answer.answer
        if mode == "silent":
            assert trio.current_time() - started >= 0.6
        assert corp.ids and len(default.ids) == 1  # www.test only
        stats = proxy.split.statistics()
        # Silent: the proxy's SERVFAIL (a failure); SERVFAIL: the upstream's, passed on.
        failed = 1 if mode == "silent" else 0
        assert stats.failures == {"corp": failed, DEFAULT_ROUTE: 0}
        assert stats.forwarded == {"corp": 1 - failed, DEFAULT_ROUTE: 1}
    finally:
        await proxy.aclose()


async def test_reload_swaps_routes_starts_a_new_cache_and_keeps_counters(
    nursery: trio.Nursery,
) -> None:
    default = await serve(nursery, "answer", DEFAULT_ADDR)
    corp = await serve(nursery, "answer", CORP_ADDR)
    lab = await serve(nursery, "answer", LAB_ADDR)
    corp_route = DnsRoute(name="corp", domains=("*.corp.test",), upstreams=(corp.url,))
    proxy = DnsProxy(dns_config(default, corp_route), Dialer())
    try:
        assert addresses((await ask(proxy, "a.corp.test")).to_wire()) == [CORP_ADDR]
        assert addresses((await ask(proxy, "a.lab.test")).to_wire()) == [DEFAULT_ADDR]
        lab_route = DnsRoute(name="lab", domains=("lab.test", "*.lab.test"), upstreams=(lab.url,))
        old = proxy.split
        proxy.reconfigure(dns_config(default, lab_route, corp_route), Dialer())
        assert proxy.split is not old
        # Cached before, but now another route's name: asked again, of its new upstreams.
        assert addresses((await ask(proxy, "a.lab.test", 2)).to_wire()) == [LAB_ADDR]
        assert addresses((await ask(proxy, "a.corp.test", 2)).to_wire()) == [CORP_ADDR]
        assert len(corp.ids) == 2  # the cache was started again with the new routes
        stats = proxy.split.statistics()
        assert list(stats.queries) == ["lab", "corp", DEFAULT_ROUTE]
        assert stats.queries == {"lab": 1, "corp": 2, DEFAULT_ROUTE: 1}
        await proxy.close_retired()  # the old table's sockets are closed
        pools = [u.pool for r in old.routes for u in r.upstreams.upstreams
                 if isinstance(u, UdpUpstream)]  # fmt: skip
        assert len(pools) == 2 and all(pool.sockets == 0 for pool in pools)
        # The same routes again: the cache is kept.
        proxy.reconfigure(dns_config(default, lab_route, corp_route), Dialer())
        await ask(proxy, "a.corp.test", 3)
        assert len(corp.ids) == 2
    finally:
        await proxy.aclose()


async def test_a_route_reached_by_another_protector(nursery: trio.Nursery) -> None:
    """``direct?fwmark=N``: the route's upstream sockets carry that mark, the default's not."""
    default = await serve(nursery, "answer", DEFAULT_ADDR)
    corp = await serve(nursery, "answer", CORP_ADDR)
    marked = DnsRoute(name="corp", domains=("*.corp.test",), upstreams=(corp.url,),
                      via=Direct(fwmark=0x1D))  # fmt: skip
    proxy = DnsProxy(dns_config(default, marked), Dialer())
    try:
        assert addresses((await ask(proxy, "a.corp.test")).to_wire()) == [CORP_ADDR]
        await ask(proxy, "a.test")
        marks = {r.name: {s.sock.getsockopt(socket.SOL_SOCKET, SO_MARK)
                          for u in r.upstreams.upstreams if isinstance(u, UdpUpstream)
                          for s in u.pool._sockets}
                 for r in proxy.split.routes}  # fmt: skip
        assert marks == {"corp": {0x1D}, DEFAULT_ROUTE: {0}}
        assert proxy.split.statistics().via["corp"] == "direct?fwmark=29"
    finally:
        await proxy.aclose()


def test_status_shows_a_split_dns_line_only_with_dns_routes() -> None:
    routes = {"queries": {"corp": 12, "default": 40}, "failures": {"corp": 1, "default": 0},
              "proxy_failures": {"corp": 2, "default": 0}}  # fmt: skip
    lines = status_lines({"totals": {"dns": {"queries": 52}, "dns_routes": routes}})
    assert "split dns: corp 12 (failed 1, proxy failed 2), default 40" in lines
    alone = {"queries": {"default": 40}, "failures": {"default": 0}}
    lines = status_lines({"totals": {"dns": {"queries": 40}, "dns_routes": alone}})
    assert not any(line.startswith("split dns") for line in lines)
