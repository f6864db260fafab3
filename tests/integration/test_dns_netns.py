"""The DNS proxy of ``tunlwip up`` with dig and unbound: resolution, block/allow lists and
hijack modes (topology and helpers: dnsenv.py).

Why: what users get from the proxy in the everyday case: that dig's answers are right over UDP
and TCP and both IP versions, that each plain upstream URL form works, that block/allow lists
and the blocked-answer modes behave as in a filtering resolver, and that a resolver hard-coded
by an app is answered (and filtered) by the proxy unless ``--dns-hijack`` says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dnsenv import (
    BLOCKED,
    GATEWAYS,
    HARD_CODED,
    NOT_BLOCKED,
    UPSTREAM4,
    UPSTREAM6,
    WWW4,
    WWW6,
    ZONE_A,
    Unbound,
    dig,
    dns_counters,
    expect,
    list_args,
    proxy_log,
    resolves,
    upstream,
)

# Fixtures, imported as themselves: pytest finds a fixture by its name in the test module,
# and `name as name` marks the import as deliberate (not unused) for ruff.
from dnsenv import dns_gateway as dns_gateway
from dnsenv import lists as lists
from dnsenv import start_unbound as start_unbound
from gatewayproc import RunningGateway
from netns import GATEWAY_ADDR4, GATEWAY_ADDR6, SRV_ADDR4, SRV_ADDR6, SplitTopology

pytestmark = pytest.mark.netns


# -- resolution -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("server", GATEWAYS)
def test_resolves_through_proxy(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    transport: str, server: str,
) -> None:  # fmt: skip
    """dig @gateway over UDP and TCP, v4 and v6 transport: www.test A and AAAA are unbound's
    data, the answers came over the transport asked for, and the proxy logged both queries
    as answered by the upstream."""
    gw, unbound = dns_gateway()
    opts = ("+tcp",) if transport == "tcp" else ()
    for rdtype, addr in (("A", WWW4), ("AAAA", WWW6)):
        result = dig(split.cli, server, "www.test", rdtype, *opts)
        resolves(result, rdtype, addr, gw, f"www.test {rdtype}")
        assert result.transport == transport.upper(), result.output
        assert proxy_log(gw, "www.test", rdtype) == [("NOERROR", UPSTREAM4)], gw.tail()
        assert unbound.queries("www.test", rdtype) == 1, unbound.log()
    counters = dns_counters(gw)
    assert counters["queries"] == 2 and counters["forwarded"] == 2, counters


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(UPSTREAM6, id="udp-v6"),
        pytest.param(f"tcp://{SRV_ADDR4}:53", id="tcp-v4"),
        pytest.param(f"tcp://[{SRV_ADDR6}]", id="tcp-v6-default-port"),
        pytest.param(f"udp://{SRV_ADDR4}", id="udp-v4-default-port"),
    ],
)
def test_upstream_transports(
    split: SplitTopology, dns_gateway: Callable[..., tuple[RunningGateway, Unbound]], url: str
) -> None:
    """Each plain upstream URL form reaches unbound: www.test resolves and the query log names
    the upstream used."""
    gw, unbound = dns_gateway(*upstream(url))
    resolves(dig(split.cli, GATEWAY_ADDR4, "www.test"), "A", WWW4, gw, url)
    via = [v for _, v in proxy_log(gw, "www.test")]
    addr = SRV_ADDR6 if "[" in url else SRV_ADDR4
    assert len(via) == 1 and via[0].startswith(url[:6]) and addr in via[0], gw.tail()
    assert unbound.queries("www.test") == 1, unbound.log()


# -- block and allow lists --------------------------------------------------------------------


def test_block_lists_nxdomain(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
) -> None:
    """Two block lists (domain list with ||x^, *.x and .x suffixes and an exact name; hosts
    file) and an allow list: blocked names get NXDOMAIN without reaching unbound, an exact
    rule spares the name's subdomains, and allow-listed subdomains of a blocked suffix resolve
    from unbound's data (an exact allow entry only that name, a suffix entry its subtree)."""
    gw, unbound = dns_gateway(*list_args(lists))
    assert re.search(r"dns: hijack all .*rules [1-9]", gw.log()), gw.tail()
    for name in BLOCKED:
        result = expect(dig(split.cli, GATEWAY_ADDR4, name), "NXDOMAIN", gw, name)
        assert not result.answers, result.output
        logged = [(rcode, via.split(":")[0]) for rcode, via in proxy_log(gw, name)]
        assert logged == [("NXDOMAIN", "block")], f"{name}; {gw.tail()}"
    for name in NOT_BLOCKED:
        resolves(dig(split.cli, GATEWAY_ADDR4, name), "A", ZONE_A[name], gw, name)
    # AAAA of a blocked name too, and over TCP.
    expect(dig(split.cli, GATEWAY_ADDR6, "x.ads.test", "AAAA", "+tcp"), "NXDOMAIN", gw)
    leaked = {name: unbound.queries(name) for name in BLOCKED} | {
        "x.ads.test AAAA": unbound.queries("x.ads.test", "AAAA")
    }
    assert not any(leaked.values()), f"blocked names reached the upstream: {leaked}"
    assert all(unbound.queries(name) == 1 for name in NOT_BLOCKED), unbound.log()
    counters = dns_counters(gw)
    assert counters["blocked"] == len(BLOCKED) + 1, counters


@pytest.mark.parametrize(
    ("answer", "status", "a", "aaaa"),
    [
        pytest.param("nxdomain", "NXDOMAIN", None, None, id="nxdomain"),
        pytest.param("null", "NOERROR", "0.0.0.0", "::", id="null"),
        pytest.param("refused", "REFUSED", None, None, id="refused"),
    ],
)
def test_blocked_answer(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
    answer: str,
    status: str,
    a: str | None,
    aaaa: str | None,
) -> None:
    """``--dns-blocked-answer``: NXDOMAIN, the null address (A 0.0.0.0, AAAA ::) or REFUSED
    for blocked names, v4 and v6 transport; the allow-listed name still resolves."""
    gw, _ = dns_gateway(*list_args(lists), "--dns-blocked-answer", answer)
    for server in (GATEWAY_ADDR4, GATEWAY_ADDR6):
        for rdtype, addr in (("A", a), ("AAAA", aaaa)):
            result = expect(dig(split.cli, server, "x.ads.test", rdtype), status, gw, rdtype)
            assert result.data(rdtype) == ([addr] if addr else []), result.output
    resolves(dig(split.cli, GATEWAY_ADDR4, "ok.ads.test"), "A", ZONE_A["ok.ads.test"], gw)


# -- hijack -----------------------------------------------------------------------------------


@pytest.mark.parametrize("resolver", HARD_CODED)
def test_hijack_all_answers_hard_coded_resolver(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
    resolver: str,
) -> None:
    """Default ``--dns-hijack all``: ``dig @198.18.1.2`` (unbound's own address, as an app with a
    hard-coded resolver would) is answered by the proxy over UDP and TCP (its query log shows
    the queries) and a blocked name asked that way still gets NXDOMAIN."""
    gw, unbound = dns_gateway(*list_args(lists))
    resolves(dig(split.cli, resolver, "www.test"), "A", WWW4, gw, "udp")
    resolves(dig(split.cli, resolver, "host1.test", "A", "+tcp"), "A", ZONE_A["host1.test"], gw)
    assert proxy_log(gw, "www.test") == [("NOERROR", UPSTREAM4)], gw.tail()
    assert proxy_log(gw, "host1.test") == [("NOERROR", UPSTREAM4)], gw.tail()
    for opts in ((), ("+tcp",)):
        result = expect(dig(split.cli, resolver, "ads.test", "A", *opts), "NXDOMAIN", gw, "ads")
        assert not result.answers, result.output
    assert unbound.queries("ads.test") == 0, unbound.log()


@pytest.mark.parametrize("resolver", HARD_CODED)
def test_hijack_gateway_forwards_other_port53(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
    resolver: str,
) -> None:
    """``--dns-hijack gateway``: port 53 to another address is forwarded untouched, so a
    blocked name asked of unbound directly gets unbound's answer (UDP and TCP) and the proxy
    logs nothing for it; asked of the gateway's address, it is still blocked."""
    gw, unbound = dns_gateway(*list_args(lists), "--dns-hijack", "gateway")
    for opts in ((), ("+tcp",)):
        result = dig(split.cli, resolver, "ads.test", "A", *opts)
        resolves(result, "A", ZONE_A["ads.test"], gw, f"direct {opts}")
    assert proxy_log(gw, "ads.test") == [], gw.tail()
    assert unbound.queries("ads.test") == 2, unbound.log()
    expect(dig(split.cli, GATEWAY_ADDR4, "ads.test"), "NXDOMAIN", gw, "via the gateway")
    expect(dig(split.cli, GATEWAY_ADDR6, "ads.test", "A", "+tcp"), "NXDOMAIN", gw, "v6 tcp")
    assert unbound.queries("ads.test") == 2, unbound.log()


def test_hijack_off_forwards_everything(
    split: SplitTopology,
    dns_gateway: Callable[..., tuple[RunningGateway, Unbound]],
    lists: dict[str, Path],
) -> None:
    """``--dns-hijack off``: no proxy; a blocked name asked of unbound gets unbound's answer,
    and nothing answers DNS on the gateway's own address."""
    gw, unbound = dns_gateway(*list_args(lists), "--dns-hijack", "off")
    resolves(dig(split.cli, SRV_ADDR4, "ads.test"), "A", ZONE_A["ads.test"], gw, "direct")
    assert unbound.queries("ads.test") == 1, unbound.log()
    result = dig(split.cli, GATEWAY_ADDR4, "www.test", "A", wait=1)
    assert result.status is None, f"{result.output}\n{gw.tail()}"
    assert proxy_log(gw, "ads.test") == [] and proxy_log(gw, "www.test") == [], gw.tail()
