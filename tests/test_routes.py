"""The route table's decisions and counters (tunlwip.egress.routes).

Why: a route decides where a flow's bytes go (directly, through a proxy, or nowhere), per SYN;
a wrong match leaks traffic around a proxy or breaks a split tunnel. The rules are few (keys
AND, values OR, first match, implicit direct, no name no domain match) and each is pinned here,
on IPv4 and IPv6, together with what the decision tells the caller about names and sniffing,
and the counters the operator sees.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import re
from pathlib import Path

import pytest

from test_metrics import parse, value
from tunlwip import metrics
from tunlwip.config.routes import Route
from tunlwip.egress.custom import CustomVia
from tunlwip.egress.routes import RouteTable, route_table
from tunlwip.egress.via import Direct, Drop, HttpProxy, Reject, Socks5Proxy, parse_via
from tunlwip.endpoint import Endpoint
from tunlwip.errors import ConfigError

from configfiles import load_text
from configfiles import no_etc as no_etc

CLIENT = Endpoint.parse("198.18.0.2", 40000)
CLIENT6 = Endpoint.parse("fd00:18::2", 40000)
SOCKS = Socks5Proxy("198.18.1.1", 1080)


def net(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


def to(address: str, port: int = 443) -> Endpoint:
    return Endpoint.parse(address, port)


def test_no_routes_is_direct_for_everything() -> None:
    table = RouteTable()
    decision = table.decide("tcp", CLIENT, to("198.18.9.9"))
    assert (decision.index, decision.name, decision.via) == (0, "default", Direct())
    assert not decision.sniff and not decision.needs_name
    assert len(table) == 0 and not table.uses_names and not table.sniffs


def test_a_route_without_match_keys_matches_everything() -> None:
    table = RouteTable([Route(via=SOCKS)])
    for protocol, client, target in (("tcp", CLIENT, to("198.18.9.9", 1)),
                                     ("udp", CLIENT6, to("fd00:9::9", 65535))):  # fmt: skip
        assert table.decide(protocol, client, target, None).via == SOCKS  # type: ignore[arg-type]


def test_keys_and_values() -> None:
    """Keys AND together, values OR: the route takes a flow only when every key has a value
    that matches."""
    route = Route(networks=net("198.18.100.0/24", "fd00:100::/64"),
                  ports=((443, 443), (8000, 8100)), protocols=("tcp",),
                  clients=net("198.18.0.0/24"), via=SOCKS)  # fmt: skip
    table = RouteTable([route])
    assert table.decide("tcp", CLIENT, to("198.18.100.7", 443)).index == 0
    assert table.decide("tcp", CLIENT, to("198.18.100.7", 8100)).index == 0
    assert table.decide("tcp", CLIENT, to("198.18.100.7", 8000)).index == 0
    # one key off at a time: the implicit route
    assert table.decide("tcp", CLIENT, to("198.18.100.7", 7999)).index == 1
    assert table.decide("tcp", CLIENT, to("198.18.100.7", 8101)).index == 1
    assert table.decide("udp", CLIENT, to("198.18.100.7", 443)).index == 1
    assert table.decide("tcp", CLIENT, to("198.18.101.7", 443)).index == 1
    assert table.decide("tcp", to("198.18.1.2", 5), to("198.18.100.7", 443)).index == 1
    # IPv6 destination in the route's v6 network, but the client is outside its v4-only clients
    assert table.decide("tcp", CLIENT6, to("fd00:100::5", 443)).index == 1
    six = RouteTable([Route(networks=net("fd00:100::/64"), clients=net("fd00:18::/64"))])
    assert six.decide("tcp", CLIENT6, to("fd00:100::5")).index == 0
    assert six.decide("tcp", CLIENT6, to("fd00:101::5")).index == 1
    assert six.decide("tcp", CLIENT, to("198.18.100.5")).index == 1, "v6 networks never match v4"


def test_first_match_wins_and_nested_networks() -> None:
    table = RouteTable([
        Route(name="inner", networks=net("198.18.100.128/25"), via=Reject()),
        Route(name="outer", networks=net("198.18.100.0/24", "198.18.100.0/25"), via=SOCKS),
        Route(name="all", via=Drop()),
    ])  # fmt: skip
    assert table.decide("tcp", CLIENT, to("198.18.100.200")).name == "inner"
    assert table.decide("tcp", CLIENT, to("198.18.100.20")).name == "outer"
    assert table.decide("tcp", CLIENT, to("198.18.100.255")).name == "inner"
    assert table.decide("tcp", CLIENT, to("198.18.101.0")).name == "all"
    assert table.decide("udp", CLIENT6, to("fd00::1")).name == "all"


def test_domains_match_the_dns_lists_syntax() -> None:
    table = RouteTable([
        Route(name="exact", domains=("git.example.org",), via=SOCKS),
        Route(name="suffix", domains=("*.corp.example", "||ads.example^", ".b.example")),
    ])  # fmt: skip
    target = to("198.18.100.1")
    expect = {
        "git.example.org": "exact", "GIT.Example.ORG.": "exact", "x.git.example.org": "default",
        "corp.example": "suffix", "a.b.corp.example": "suffix", "xcorp.example": "default",
        "ads.example": "suffix", "b.example": "suffix", "c.b.example": "suffix",
        "example.org": "default",
    }  # fmt: skip
    for name, route in expect.items():
        assert table.decide("tcp", CLIENT, target, name).name == route, name
    assert table.uses_names and not table.sniffs


def test_a_flow_without_a_name_never_matches_domains() -> None:
    table = RouteTable([Route(name="corp", domains=("*.corp.example",), via=SOCKS),
                        Route(name="web", ports=((443, 443),), via=Direct(fwmark=7))])  # fmt: skip
    decision = table.decide("tcp", CLIENT, to("198.18.100.1"), None)
    assert decision.name == "web" and decision.needs_name, "a domain route was passed over"
    decision = table.decide("tcp", CLIENT, to("198.18.100.1"), "www.other.example")
    assert decision.name == "web" and not decision.needs_name, "the name was known"
    decision = table.decide("tcp", CLIENT, to("198.18.100.1"), "a.corp.example")
    assert decision.name == "corp" and not decision.needs_name


def test_sniff_makes_a_decision_provisional_until_the_name_is_read() -> None:
    table = RouteTable([Route(name="mesh", domains=("*.mesh.example",), sniff=True, via=SOCKS),
                        Route(name="web", ports=((443, 443),), via=Direct())])  # fmt: skip
    target = to("198.18.100.1")
    first = table.decide("tcp", CLIENT, target, None)
    assert (first.name, first.sniff, first.needs_name) == ("web", True, True)
    assert table.counters[1].tcp == 0, "a provisional decision is not counted"
    # the caller read the SNI: decide again with it
    final = table.decide("tcp", CLIENT, target, "svc.mesh.example", sniffed=True)
    assert (final.name, final.sniff) == ("mesh", False)
    # nothing found in the first bytes: decide with the DNS name (here none)
    assert table.decide("tcp", CLIENT, target, None, sniffed=True).name == "web"
    # a known name that matches needs no sniffing; UDP is never sniffed
    assert not table.decide("tcp", CLIENT, target, "a.mesh.example").sniff
    assert not table.decide("udp", CLIENT, target, None).sniff
    # a sniffing route after the winner cannot take the flow: no sniffing
    late = RouteTable([Route(name="web", ports=((443, 443),)),
                       Route(domains=("*.mesh.example",), sniff=True, via=SOCKS)])  # fmt: skip
    assert not late.decide("tcp", CLIENT, target, None).sniff
    assert table.sniffs and table.counters[0].tcp == 2 and table.counters[1].tcp == 1


def test_counters_by_route_and_protocol() -> None:
    no_quic = Route(name="no-quic", ports=((443, 443),), protocols=("udp",), via=Reject())
    silent = Route(name="silent", networks=net("198.18.66.0/24"), via=Drop())
    table = RouteTable([no_quic, silent], proxy=SOCKS)
    table.decide("udp", CLIENT, to("198.18.100.1", 443))
    table.decide("udp", CLIENT, to("198.18.66.1", 53))
    table.decide("tcp", CLIENT, to("198.18.66.1", 80))
    table.decide("tcp", CLIENT, to("198.18.100.1", 443))
    decision = table.decide("udp", CLIENT6, to("fd00::9", 443))
    assert decision.name == "no-quic"
    decision = table.decide("tcp", CLIENT6, to("fd00::9", 22))
    decision.counters.proxy_failures += 1  # what the caller does when the proxy fails
    stats = table.statistics()
    assert list(stats.via) == ["no-quic", "silent", "proxy", "default"]
    assert dict(stats.flows_tcp) == {"no-quic": 0, "silent": 1, "proxy": 2, "default": 0}
    assert dict(stats.flows_udp) == {"no-quic": 2, "silent": 1, "proxy": 0, "default": 0}
    assert dict(stats.rejected) == {"no-quic": 2, "silent": 0, "proxy": 0, "default": 0}
    assert dict(stats.dropped) == {"no-quic": 0, "silent": 2, "proxy": 0, "default": 0}
    assert stats.proxy_failures["proxy"] == 1
    assert stats.via["proxy"] == "socks5://198.18.1.1:1080"
    stats.flows_tcp["proxy"] = 0  # type: ignore[index]  # a copy: the table counts on
    assert table.statistics().flows_tcp["proxy"] == 2


def test_a_reloaded_table_keeps_the_counters_of_routes_with_the_same_name() -> None:
    old = RouteTable([Route(name="corp", networks=net("198.18.100.0/24")), Route(via=Drop())])
    old.decide("tcp", CLIENT, to("198.18.100.1"))
    old.decide("tcp", CLIENT, to("198.18.101.1"))
    new = RouteTable([Route(via=Reject()), Route(name="corp", networks=net("198.18.100.0/24"))],
                     previous=old)  # fmt: skip
    new.decide("tcp", CLIENT, to("198.18.100.1"))
    stats = new.statistics()
    assert stats.flows_tcp["corp"] == 1 and stats.rejected["0"] == 1
    assert stats.flows_tcp["0"] == 1 and stats.dropped["0"] == 0, "unnamed: counted by index"
    assert old.counters[0] is new.counters[1]


def test_http_proxy_as_catch_all_rejects_udp() -> None:
    """An HTTP CONNECT proxy carries TCP only: UDP no route took is refused, never sent
    directly around the proxy."""
    http = HttpProxy("198.18.1.1", 3128, "user", "secret")
    table = RouteTable(proxy=http)
    assert table.decide("tcp", CLIENT, to("198.18.9.9")).via == http
    udp = table.decide("udp", CLIENT, to("198.18.9.9", 53))
    assert (udp.name, udp.via) == ("proxy-udp", Reject())
    assert "secret" not in repr(table.statistics())


def test_custom_via_needs_tcp_and_a_name() -> None:
    async def opener(target: Endpoint, name: str | None) -> object:
        raise ConnectionRefusedError

    mesh = CustomVia("mesh", opener)  # type: ignore[arg-type]
    route = Route(domains=("*.mesh.example",), protocols=("tcp",), via=mesh)
    assert str(RouteTable([route]).decide("tcp", CLIENT, to("198.18.9.9"), "a.mesh.example").via) \
        == "custom:mesh"  # fmt: skip
    with pytest.raises(ConfigError, match=r"route\.via: a custom via carries TCP only"):
        Route(via=mesh)
    with pytest.raises(ConfigError, match="a name is 1-32 characters"):
        CustomVia("Bad Name", opener)  # type: ignore[arg-type]


def test_embedders_routes_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"route.ports\[0\]: \[80, 70\] is not a port range"):
        Route(ports=((80, 70),))
    with pytest.raises(ConfigError, match=r"route\.domains: an empty list matches nothing"):
        Route(domains=())
    with pytest.raises(ConfigError, match=r'route\.name: "default" is reserved'):
        Route(name="default")
    with pytest.raises(ConfigError, match="names must differ, a more than once"):
        RouteTable([Route(name="a"), Route(name="a")])
    with pytest.raises(ConfigError, match=r"route\[1\]: expected a Route"):
        RouteTable([Route(), "direct"])  # type: ignore[list-item]


def test_the_table_of_a_configuration(tmp_path: Path) -> None:
    text = '[[route]]\nname = "lan"\nnetworks = ["198.18.5.0/24"]\nvia = "direct?interface=eth1"\n'
    settings = load_text(tmp_path, text, **{"egress.proxy": "socks5://198.18.1.1:1080"})
    table = route_table(settings.gateway)
    assert table.names == ("lan", "proxy", "default")
    assert table.decide("tcp", CLIENT, to("198.18.5.5")).via == parse_via("direct?interface=eth1")
    assert table.decide("tcp", CLIENT, to("198.18.6.5")).via == SOCKS


def test_many_routes_agree_with_a_plain_scan() -> None:
    """The bitset index against the definition (first route whose keys all match), on random
    tables and flows: nested and overlapping networks, ranges, both families."""
    rng = random.Random(16)

    def random_route(i: int) -> Route:
        nets = rng.choice([None, tuple(ipaddress.ip_network(f"198.18.{rng.randrange(8)}.0/"
                                                             f"{rng.choice([22, 24, 26])}",
                                                             strict=False)
                                       for _ in range(rng.randrange(1, 3))),
                           net("fd00:1::/32")])  # fmt: skip
        ports = rng.choice([None, tuple((p, p + rng.randrange(50))
                                        for p in rng.sample(range(1, 200), 2))])  # fmt: skip
        protocols = rng.choice([None, ("tcp",), ("udp",)])
        domains = rng.choice([None, (f"*.d{rng.randrange(4)}.example",), ("x.d1.example",)])
        return Route(networks=nets, ports=ports, protocols=protocols, domains=domains)  # type: ignore[arg-type]

    def scan(routes: list[Route], protocol: str, target: Endpoint, name: str | None) -> int:
        for i, route in enumerate(routes):
            if route.protocols is not None and protocol not in route.protocols:
                continue
            port, address = target.port, target.address
            if route.ports is not None and not any(lo <= port <= hi for lo, hi in route.ports):
                continue
            if route.networks is not None and not any(address in n for n in route.networks):
                continue
            if route.domains is not None and (name is None or not any(
                    name == d.removeprefix("*.") or name.endswith(d[1:]) if d.startswith("*.")
                    else name == d for d in route.domains)):  # fmt: skip
                continue
            return i
        return len(routes)

    for _ in range(20):
        routes = [random_route(i) for i in range(rng.randrange(1, 60))]
        table = RouteTable(routes)
        for _ in range(200):
            address = rng.choice([f"198.18.{rng.randrange(9)}.{rng.randrange(256)}",
                                  f"fd00:{rng.randrange(3)}::{rng.randrange(99)}"])  # fmt: skip
            target, protocol = to(address, rng.randrange(1, 260)), rng.choice(["tcp", "udp"])
            name = rng.choice([None, "a.d0.example", "x.d1.example", "d2.example", "n.example"])
            got = table.decide(protocol, CLIENT, target, name).index  # type: ignore[arg-type]
            assert got == scan(routes, protocol, target, name), (routes, protocol, target, name)


def test_the_documented_example_runs() -> None:
    """docs/routing.md's code example, as printed there."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "routing.md"
    (block,) = re.findall(r"```python\n(.*?)```", docs.read_text(), re.S)
    namespace: dict[str, object] = {}
    exec(block, namespace)
    decision = namespace["decision"]
    assert (decision.index, decision.name) == (0, "corp")  # type: ignore[attr-defined]
    assert decision.via == Socks5Proxy("198.18.1.1", 1080)  # type: ignore[attr-defined]


def test_route_counters_in_the_metrics() -> None:
    """The statistics schema's route families, labelled by route, from the snapshot's shape
    (what the gateway will put at ``totals.routes``)."""
    table = RouteTable([Route(name="no-quic", protocols=("udp",), via=Reject())], proxy=SOCKS)
    table.decide("udp", CLIENT, to("198.18.9.9"))
    table.decide("tcp", CLIENT, to("198.18.9.9")).counters.proxy_failures += 1
    snapshot = table.statistics()
    routes = {field.name: dict(getattr(snapshot, field.name))
              for field in dataclasses.fields(snapshot)}  # fmt: skip
    families = parse(metrics.render({"totals": {"routes": routes}}).decode())
    assert value(families, "tunlwip_route_flows_udp_total", route="no-quic") == 1
    assert value(families, "tunlwip_route_rejected_total", route="no-quic") == 1
    assert value(families, "tunlwip_route_flows_tcp_total", route="proxy") == 1
    assert value(families, "tunlwip_route_proxy_failures_total", route="proxy") == 1
    assert value(families, "tunlwip_route_dropped_total", route="default") == 0
    empty = parse(metrics.render({"totals": {"routes": None}}).decode())
    assert not empty["tunlwip_route_flows_tcp"].samples, "no route table: no samples"
