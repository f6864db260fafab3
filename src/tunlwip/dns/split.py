"""Split DNS: which upstreams resolve a query, chosen by its name (``[[dns.route]]``).

Theory of operation
-------------------
A ``SplitUpstreams`` holds the ``[[dns.route]]`` tables in order, each with its own
``UpstreamSet`` (its own failover, pooled connections and via), and the default upstreams
(``dns.upstreams``, reached by way of ``dns.via``) after them, named ``default``. The first
route whose ``domains`` match the question's name takes the query (conditional forwarding, as
dnsmasq's ``server=/domain/ip``); a name no route matches goes to the default upstreams. A
query a route took goes to that route's upstreams only: when they all fail, the client gets
SERVFAIL, never an answer from another route's servers (which may not know the name, or must
not learn it).

Matching uses the DNS lists' syntax (``policy.parse_name_rule``): a dict of exact names and a
dict of suffixes, each to the lowest route index that has it; a lookup probes the name and
each of its parents (O(labels)), never the route list. With no routes, ``pick`` returns the
default at once.

The cache stays correct because the route is a function of the question's name alone, and
the cache is keyed by the question: an answer cached for a name came from the upstreams of
that name's route. A reload that changes the routes starts a new cache (``DnsProxy``).

Built once per configuration and never changed; a reload builds a new one (``from_config``
with the running one as ``previous``, whose counters go on by route name) and the proxy swaps
the reference, so each query is resolved by one table, whole; the old one's connections are
closed by ``aclose`` (``DnsProxy.close_retired``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import dns.name

from ..dialer import Dialer
from ..egress.via import Via
from .policy import parse_name_rule
from .upstream_via import ProxiedDialer, UpstreamDialer, upstream_dialer
from .upstreams import UpstreamSet, parse_upstream

if TYPE_CHECKING:
    from ..config.sections import DnsConfig

__all__ = ["DEFAULT_ROUTE", "DnsRouteCounters", "DnsRouteStatistics", "SplitRoute",
           "SplitUpstreams"]  # fmt: skip

#: The name of the default upstreams among the routes (counters, metrics' label).
DEFAULT_ROUTE = "default"


@dataclasses.dataclass(slots=True)
class DnsRouteCounters:
    """What one DNS route did, since the first configuration that had a route of its name."""

    queries: int = 0  #: queries whose name it took (cache hits included)
    forwarded: int = 0  #: of those, answered by its upstreams
    failures: int = 0  #: of those, answered SERVFAIL: its upstreams failed or were too slow


@dataclasses.dataclass(slots=True)
class SplitRoute:
    """One route as the proxy uses it: its name, its upstreams, its counters."""

    name: str
    upstreams: UpstreamSet
    counters: DnsRouteCounters
    via: str  #: how its upstreams are reached, as text (never a password)
    #: What opens its upstreams' connections (a ``ProxiedDialer`` counts proxy failures).
    dialer: UpstreamDialer

    @property
    def proxy_failures(self) -> int:
        """Upstream connections its proxy failed to open (0 without a proxy)."""
        return self.dialer.failures if isinstance(self.dialer, ProxiedDialer) else 0


@dataclasses.dataclass(frozen=True)
class DnsRouteStatistics:
    """A snapshot of every DNS route's counters, route name -> value, in route order, the
    default upstreams last (the statistics schema's ``dns_routes``; metrics labelled
    ``dns_route``)."""

    upstreams: Mapping[str, str]  #: each route's upstream URLs, space-separated
    via: Mapping[str, str]
    queries: Mapping[str, int]
    forwarded: Mapping[str, int]
    failures: Mapping[str, int]
    #: Upstream connections each route's proxy failed to open (0 without a proxy).
    proxy_failures: Mapping[str, int]


class SplitUpstreams:
    """The DNS routes and the default upstreams; ``pick`` chooses by name."""

    def __init__(self, routes: Sequence[tuple[SplitRoute, Sequence[str]]], default: SplitRoute,
                 ) -> None:  # fmt: skip
        """``routes``: each route with its ``domains`` (the lists' syntax), in order."""
        self.routes: tuple[SplitRoute, ...] = (*(route for route, _ in routes), default)
        self.default = default
        exact: dict[str, int] = {}
        suffix: dict[str, int] = {}
        for index, (_, domains) in enumerate(routes):
            for rule in domains:
                parsed = parse_name_rule(rule)
                if parsed is None:  # DnsRoute checked it
                    raise ValueError(f"dns.route[{index}].domains: {rule!r} is not a name")
                (suffix if parsed[1] else exact).setdefault(parsed[0], index)
        self._exact, self._suffix = exact, suffix
        self._none = len(routes)  # the default's index

    @classmethod
    def from_config(cls, config: DnsConfig, dialer: Dialer, default_urls: Sequence[str],
                    previous: SplitUpstreams | None = None) -> SplitUpstreams:  # fmt: skip
        """The routes of ``config`` (``dns.route``), then ``default_urls`` (``dns.upstreams``
        or the resolv.conf nameservers) by way of ``dns.via``. Every URL is parsed and every
        TLS context loaded here, so a bad one raises ConfigError before anything changes.
        ``previous``: the running one, whose counters go on by route name."""
        counters = {} if previous is None else {r.name: r.counters for r in previous.routes}

        def build(name: str, urls: Sequence[str], via: Via | None) -> SplitRoute:
            if via is not None:  # (the config structs checked it: this is for the message)
                for url in urls:
                    parse_upstream(url, dialer, ca_file=config.ca_file, via=via)
            opener = upstream_dialer(via, dialer)  # one per route: its counters are the route's
            upstreams = [parse_upstream(url, opener, ca_file=config.ca_file) for url in urls]
            return SplitRoute(name, UpstreamSet(upstreams, attempt_timeout=config.attempt_timeout),
                              counters.get(name) or DnsRouteCounters(),
                              str(via) if via is not None else "direct", opener)  # fmt: skip

        routes = [(build(route.name or str(index), route.upstreams or (), route.via),
                   route.domains or ()) for index, route in enumerate(config.routes)]  # fmt: skip
        return cls(routes, build(DEFAULT_ROUTE, default_urls, config.via))

    def __len__(self) -> int:
        """The DNS routes given (the default upstreams not counted)."""
        return len(self.routes) - 1

    def __repr__(self) -> str:
        return f"<SplitUpstreams {', '.join(r.name for r in self.routes)}>"

    def describe_routes(self) -> str:
        """The DNS routes for the log: ``name [upstreams] via V``, ``; ``-separated ("" without
        routes)."""
        return "; ".join(
            f"{r.name} [{' '.join(u.url for u in r.upstreams.upstreams)}] via {r.via}"
            for r in self.routes[:-1]
        )

    def pick(self, name: str | dns.name.Name) -> SplitRoute:
        """The route of a query for ``name`` (text as the query summary gives it, lowercased
        without the final dot; or a dnspython name)."""
        if self._none == 0:
            return self.default
        if isinstance(name, dns.name.Name):
            text = name.to_text(omit_final_dot=True).lower()
        else:
            text = name.removesuffix(".").lower()
        best = self._exact.get(text, self._none)
        suffixes = self._suffix
        if suffixes:
            start = 0
            while True:
                index = suffixes.get(text[start:] if start else text)
                if index is not None and index < best:
                    best = index
                start = text.find(".", start) + 1
                if not start:
                    break
        return self.routes[best]

    def statistics(self) -> DnsRouteStatistics:
        """A snapshot of the counters (plain dicts, fresh copies: a snapshot must pickle)."""

        def each(field: str) -> dict[str, int]:
            return {route.name: getattr(route.counters, field) for route in self.routes}

        urls = {r.name: " ".join(u.url for u in r.upstreams.upstreams) for r in self.routes}
        return DnsRouteStatistics(
            upstreams=urls,
            via={route.name: route.via for route in self.routes},
            queries=each("queries"),
            forwarded=each("forwarded"),
            failures=each("failures"),
            proxy_failures={route.name: route.proxy_failures for route in self.routes},
        )

    async def aclose(self) -> None:
        """Close every route's pooled connections and sockets."""
        for route in self.routes:
            await route.upstreams.aclose()
