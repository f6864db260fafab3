"""The route table: which route a new flow takes, decided per SYN (or first datagram) in
O(log routes + labels), and how many flows each route took.

Theory of operation
-------------------
A ``RouteTable`` is built once from ``Route`` records (the ``[[route]]`` tables, then the
``egress.proxy`` catch-all, then the implicit ``direct`` route named ``default``) and never
changes; SIGHUP builds a new one (``route_table``) and the gateway swaps the reference, so a
flow is decided by one table, whole. ``decide`` is the only call on the data path.

First match wins, and a route matches when each key it gives matches, so the answer is "the
lowest route index in the intersection of the routes each key lets through". Each key is
indexed once as *route bitsets* (Python ints, bit i = route i; a route without that key is
in every set of it):

* protocol: one set each for tcp and udp;
* destination and client address: per family, the address space cut at every network's
  bounds into intervals, each with the set of routes whose networks cover it; a lookup is
  one ``bisect`` on the sorted interval starts (nested and overlapping networks are fine);
* port: the same over 0-65535;
* name: the DNS lists' syntax (``dns.policy.parse_name_rule``): a dict of exact names and a
  dict of suffixes to sets; a lookup probes the name and each parent, as the DNS lists do.

``decide`` ANDs the sets and takes the lowest bit; the routes below it that matched every key
but the name say whether the flow's name mattered (``needs_name``: no name was known) and
whether a sniffing route could still take it (``sniff``). The decisions are made in advance
(four per route), so a decision costs no allocation, and the counters are plain attributes.

Names at SYN time (docs/routing.md): the caller passes the name the client resolved for this
address through the DNS proxy (``DnsProxy.name_for``), or None. A decision with ``sniff``
set is provisional and not counted: accept the connection, read the TLS SNI or HTTP Host from
the first bytes (``sniff.sniff_name``), and decide again with that name (or the DNS name,
when the bytes had none) and ``sniffed=True``.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address

from ..config.routes import IMPLICIT_NAME, Protocol, Route, RouteVia, proxy_routes
from ..config.sections import GatewayConfig
from ..dns.policy import parse_name_rule
from ..endpoint import Endpoint
from ..errors import ConfigError
from .via import Direct, Drop, Reject, Via

__all__ = ["RouteCounters", "RouteDecision", "RouteStatistics", "RouteTable", "route_table"]


@dataclasses.dataclass(slots=True)
class RouteCounters:
    """What one route did, since the first table that had a route of its name."""

    tcp: int = 0  #: TCP flows decided for it
    udp: int = 0  #: UDP flows (sessions) decided for it
    rejected: int = 0  #: of those, refused as a closed port (via reject)
    dropped: int = 0  #: of those, dropped silently (via drop)
    proxy_failures: int = 0  #: flows its proxy could not open (counted by the caller)


@dataclasses.dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a flow goes: route ``index`` (the implicit last route is ``len(table)``),
    ``name``, ``via``; ``sniff``: provisional, a sniffing route may take the flow once its
    first bytes are read (decide again with ``sniffed=True``); ``needs_name``: a route with
    ``domains`` would have been considered had the flow's name been known."""

    index: int
    name: str
    via: RouteVia
    sniff: bool = False
    needs_name: bool = False
    counters: RouteCounters = dataclasses.field(default_factory=RouteCounters, compare=False,
                                                repr=False)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RouteStatistics:
    """A snapshot of every route's counters, in the shape of the statistics schema: one
    mapping per counter, route name -> value, in route order (a Prometheus family labelled
    ``route``: ``stats.METRICS``)."""

    via: Mapping[str, str]  #: each route's via, as text (no passwords), first route first
    flows_tcp: Mapping[str, int]
    flows_udp: Mapping[str, int]
    rejected: Mapping[str, int]
    dropped: Mapping[str, int]
    proxy_failures: Mapping[str, int]


class _Intervals:
    """Route sets over an integer space cut into intervals: the set of the interval holding x
    (``masks[bisect_right(starts, x) - 1]``) is the routes whose ranges cover x, plus
    ``wildcard`` (the routes without this key)."""

    __slots__ = ("masks", "starts")

    def __init__(self, ranges: Iterable[tuple[int, int, int]], wildcard: int) -> None:
        """``ranges``: (route, start, end exclusive)."""
        events: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for route, start, end in ranges:
            events[start].append((route, 1))
            events[end].append((route, -1))
        covering: Counter[int] = Counter()  # a route's ranges may overlap: count them
        mask = wildcard
        starts, masks = [0], [wildcard]
        for point in sorted(events):
            for route, delta in events[point]:
                before = covering[route]
                covering[route] += delta
                if not before:
                    mask |= 1 << route
                elif not covering[route]:
                    mask &= ~(1 << route)
            if masks[-1] == mask:
                continue
            if starts[-1] == point:
                masks[-1] = mask
            else:
                starts.append(point)
                masks.append(mask)
        self.starts, self.masks = starts, masks


#: Interval starts and their route sets, by address type: what ``decide`` bisects.
_AddressIndex = dict[type, tuple[list[int], list[int]]]


def _network_index(routes: Sequence[Route], key: str) -> _AddressIndex | None:
    """The intervals of the networks of ``key`` ("networks" or "clients") for each address
    type; None when no route has the key (every flow passes it)."""
    if all(getattr(route, key) is None for route in routes):
        return None
    wildcard = sum(1 << i for i, route in enumerate(routes) if getattr(route, key) is None)
    by_family: dict[int, list[tuple[int, int, int]]] = {4: [], 6: []}
    for i, route in enumerate(routes):
        for net in getattr(route, key) or ():
            by_family[net.version].append((i, int(net.network_address),
                                           int(net.broadcast_address) + 1))  # fmt: skip
    four, six = _Intervals(by_family[4], wildcard), _Intervals(by_family[6], wildcard)
    return {IPv4Address: (four.starts, four.masks), IPv6Address: (six.starts, six.masks)}


class RouteTable:
    """The routes in order, then the implicit ``direct`` route (``default``); see the module
    docstring. ``proxy``: ``egress.proxy``'s catch-all. ``previous``: the table this one
    replaces; routes of the same name keep counting in the same counters."""

    def __init__(self, routes: Sequence[Route] = (), *, proxy: Via | None = None,
                 previous: RouteTable | None = None) -> None:  # fmt: skip
        named: list[tuple[str, Route]] = []
        for index, route in enumerate(routes):
            if not isinstance(route, Route):
                raise ConfigError(f"route[{index}]: expected a Route, got {type(route).__name__}")
            named.append((route.name or str(index), route))
        named += proxy_routes(proxy)
        names = [name for name, _ in named] + [IMPLICIT_NAME]
        if len(set(names)) != len(names):
            twice = sorted(name for name, count in Counter(names).items() if count > 1)
            raise ConfigError(f"route: names must differ, {', '.join(twice)} more than once")
        self.routes: tuple[Route, ...] = tuple(route for _, route in named)
        self.names: tuple[str, ...] = tuple(names)
        self.vias: tuple[RouteVia, ...] = (*(route.via for route in self.routes), Direct())
        old = previous._counters_by_name() if previous is not None else {}
        self.counters: tuple[RouteCounters, ...] = tuple(old.get(name) or RouteCounters()
                                                         for name in names)  # fmt: skip
        self._build(self.routes)

    def _build(self, routes: Sequence[Route]) -> None:
        count = len(routes)
        everything = (1 << count) - 1
        self._protocols: dict[str, int] = {
            protocol: sum(1 << i for i, route in enumerate(routes)
                          if route.protocols is None or protocol in route.protocols)
            for protocol in ("tcp", "udp")}  # fmt: skip
        self._ports: tuple[list[int], list[int]] | None = None
        if any(route.ports is not None for route in routes):
            ports = _Intervals(
                ((i, low, high + 1) for i, route in enumerate(routes)
                 for low, high in route.ports or ()),
                sum(1 << i for i, route in enumerate(routes) if route.ports is None))  # fmt: skip
            self._ports = (ports.starts, ports.masks)
        self._targets = _network_index(routes, "networks")
        self._clients = _network_index(routes, "clients")
        self._no_domains = sum(1 << i for i, route in enumerate(routes) if route.domains is None)
        self._sniffing = sum(1 << i for i, route in enumerate(routes) if route.sniff)
        self._exact: dict[str, int] = defaultdict(int)
        self._suffix: dict[str, int] = defaultdict(int)
        for i, route in enumerate(routes):
            for rule in route.domains or ():
                parsed = _name_rule(rule)
                (self._suffix if parsed[1] else self._exact)[parsed[0]] |= 1 << i
        self._exact, self._suffix = dict(self._exact), dict(self._suffix)
        self._uses_names = self._no_domains != everything
        # Four decisions per route, (sniff, needs_name), made once.
        self._decisions = tuple(
            tuple(RouteDecision(i, name, via, sniff, needs, counters)
                  for sniff in (False, True) for needs in (False, True))
            for i, (name, via, counters) in enumerate(zip(self.names, self.vias, self.counters,
                                                          strict=True)))  # fmt: skip
        self._refusal = tuple(1 if isinstance(via, Reject) else 2 if isinstance(via, Drop)
                              else 0 for via in self.vias)  # fmt: skip

    def __len__(self) -> int:
        """The routes given (the implicit last route, index ``len(table)``, not counted)."""
        return len(self.routes)

    def __repr__(self) -> str:
        return f"<RouteTable {len(self.routes)} routes: {', '.join(self.names)}>"

    @property
    def uses_names(self) -> bool:
        """Some route has ``domains``: the flow's name is worth looking up."""
        return self._uses_names

    @property
    def sniffs(self) -> bool:
        """Some route has ``sniff = true``."""
        return bool(self._sniffing)

    def decide(self, protocol: Protocol, client: Endpoint, target: Endpoint,
               name: str | None = None, *, sniffed: bool = False) -> RouteDecision:  # fmt: skip
        """The route of a new flow from ``client`` to ``target`` whose name is ``name`` (None:
        unknown); counted unless ``sniff`` makes it provisional (see the module docstring).
        ``protocol`` is "tcp" or "udp"."""
        match = self._protocols[protocol]
        if match and self._ports is not None:
            starts, masks = self._ports
            match &= masks[bisect_right(starts, target.port) - 1]
        # Addresses by their type and integer (``_ip``: ``int()`` and ``.version`` are
        # Python-level calls, a third of a decision's cost on a small table; a Python without
        # ``_ip`` fails every test of this module).
        if match and self._targets is not None:
            address = target.address
            starts, masks = self._targets[type(address)]
            match &= masks[bisect_right(starts, address._ip) - 1]  # type: ignore[union-attr]
        if match and self._clients is not None:
            address = client.address
            starts, masks = self._clients[type(address)]
            match &= masks[bisect_right(starts, address._ip) - 1]  # type: ignore[union-attr]
        hits = match & self._no_domains
        if match and name is not None and self._uses_names:
            hits |= match & self._name_set(name.lower().rstrip("."))
        index = (hits & -hits).bit_length() - 1 if hits else len(self.routes)
        missed = match & ((1 << index) - 1)  # matched all but the name, before the winner
        sniff = bool(missed & self._sniffing) and protocol == "tcp" and not sniffed
        decision = self._decisions[index][sniff * 2 + (missed != 0 and name is None)]
        if not sniff:
            counters = decision.counters
            if protocol == "tcp":
                counters.tcp += 1
            else:
                counters.udp += 1
            refusal = self._refusal[index]
            if refusal == 1:
                counters.rejected += 1
            elif refusal == 2:
                counters.dropped += 1
        return decision

    def _name_set(self, name: str) -> int:
        """The routes whose domains match ``name``: exactly, or as a suffix of it."""
        found = self._exact.get(name, 0)
        suffixes = self._suffix
        if suffixes:
            start = 0
            while True:
                found |= suffixes.get(name[start:] if start else name, 0)
                start = name.find(".", start) + 1
                if not start:
                    break
        return found

    def statistics(self) -> RouteStatistics:
        """A snapshot of the counters (``RouteStatistics``)."""

        def each(field: str) -> Mapping[str, int]:
            # Plain dicts, each a fresh copy: a snapshot must pickle and deep-copy.
            return {
                name: getattr(counters, field)
                for name, counters in zip(self.names, self.counters, strict=True)
            }

        vias = {name: str(via) for name, via in zip(self.names, self.vias, strict=True)}
        return RouteStatistics(
            via=vias,
            flows_tcp=each("tcp"),
            flows_udp=each("udp"),
            rejected=each("rejected"),
            dropped=each("dropped"),
            proxy_failures=each("proxy_failures"),
        )

    def _counters_by_name(self) -> dict[str, RouteCounters]:
        return dict(zip(self.names, self.counters, strict=True))


def _name_rule(rule: str) -> tuple[str, bool]:
    parsed = parse_name_rule(rule)
    if parsed is None:  # Route checked it; a Route built around its check is still refused
        raise ConfigError(f"route.domains: {rule!r} is not a name")
    return parsed


def route_table(config: GatewayConfig, previous: RouteTable | None = None) -> RouteTable:
    """The table of a configuration: its ``[[route]]`` tables, then ``egress.proxy``, then
    ``direct``. On SIGHUP pass the running table as ``previous`` (its counters go on)."""
    return RouteTable(config.routes, proxy=config.proxy, previous=previous)
