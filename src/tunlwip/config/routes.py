"""The ``[[route]]`` tables: one ``Route`` struct per table, its keys, rules and file form.

Theory of operation
-------------------
A route's keys are declared like every other key (``fields.setting``), on the fields of the
frozen ``Route`` struct, with the key path ``route.KEY``; ``Route.__post_init__`` runs their
rules and the rules between them, so an embedder's ``Route(...)`` and a file's table meet the
same checks. The file holds an ordered list of such tables (``[[route]]``): ``parse_routes``
reads it for the loader with the table's index in every key path (``route[2].ports[1]: "80-70"
is not a port range``), unknown keys with a "did you mean"; ``routes_toml`` writes it back for
``--print`` (proxy passwords left out, as everywhere text is shown).

A key left out matches anything; a key given lists values, any of which matches; a route
matches a flow when each key it gives does (``egress.routes.RouteTable`` does the matching).
An empty list would match nothing, which is never what was meant: it is refused.

``egress.proxy`` (the ``--proxy`` flag) is a catch-all after the tables: ``proxy_routes``
makes its routes, named ``proxy`` (and ``proxy-udp``, rejecting UDP, when the proxy cannot
carry it).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from ..dns.policy import parse_name_rule
from ..egress.custom import CustomVia
from ..egress.via import Direct, Drop, HttpProxy, Reject, Socks5Proxy, Via, parse_via
from ..errors import ConfigError
from .fields import check_fields, setting, spec_of
from .kinds import Boolean, Choice, Kind, ListOf, Network, show
from .tables import duplicate_names, parse_tables

__all__ = ["RESERVED_NAMES", "ROUTE_KEYS", "Protocol", "Route", "RouteVia", "parse_routes",
           "proxy_routes", "routes_toml"]  # fmt: skip

Protocol = Literal["tcp", "udp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RouteVia = Via | CustomVia
#: The route no table matched (``direct``) and those ``egress.proxy`` makes.
IMPLICIT_NAME, PROXY_NAME, PROXY_UDP_NAME = "default", "proxy", "proxy-udp"
RESERVED_NAMES = frozenset({IMPLICIT_NAME, PROXY_NAME, PROXY_UDP_NAME})
_VIA_TYPES = (Direct, Socks5Proxy, HttpProxy, Reject, Drop, CustomVia)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_PORT_RANGE = re.compile(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?")


class RouteName(Kind):
    """A route's name: shown in status, flow records and metrics' ``route`` label."""

    doc = "route name"
    expected = "a name of 1-64 letters, digits, _ . or - (not all digits: those are indexes)"

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, str) or not _NAME.fullmatch(value) or value.isdigit():
            raise self.wrong(where, shown)
        if value in RESERVED_NAMES:
            raise ConfigError(f"{where}: {shown} is reserved (the implicit last route is "
                              "default, egress.proxy's are proxy and proxy-udp)")  # fmt: skip


class NameRule(Kind):
    """A name in the DNS lists' syntax (``dns.policy.parse_name_rule``)."""

    doc = "name (`a.example`, `*.a.example`)"
    expected = "a name such as example.com or *.example.com"

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, str) or parse_name_rule(value) is None:
            raise ConfigError(f"{where}: {shown} is not a name (example.com; *.example.com, "
                              ".example.com or ||example.com^: it and all under it)")  # fmt: skip

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        return raw.strip() if isinstance(raw, str) else raw


class PortRange(Kind):
    """A port or an inclusive range, held as (low, high)."""

    doc = 'port or "low-high"'
    expected = 'a port range ("443" or "8000-8100")'

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return (raw, raw)
        match = _PORT_RANGE.fullmatch(raw) if isinstance(raw, str) else None
        if match is None:
            raise self._bad(where, show(raw))
        low = int(match.group(1))
        return (low, int(match.group(2)) if match.group(2) else low)

    def check(self, value: Any, where: str, shown: str) -> None:
        ok = isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(p, int) and not isinstance(p, bool) for p in value)  # fmt: skip
        if not ok or not 1 <= value[0] <= value[1] <= 65535:
            raise self._bad(where, shown)

    @staticmethod
    def _bad(where: str, shown: str) -> ConfigError:
        return ConfigError(f"{where}: {shown} is not a port range (a port 1-65535 such as 443, "
                           'or "low-high" such as "8000-8100")')  # fmt: skip

    def dump(self, value: Any) -> str:
        low, high = value
        return str(low) if low == high else show(f"{low}-{high}")


class ViaUrl(Kind):
    """Where a route's flows go (``egress.via.parse_via``); in code also a ``CustomVia``."""

    doc = "via URL"
    expected = "a via such as direct or socks5://host:1080"

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        try:
            return parse_via(raw)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, _VIA_TYPES):
            raise self.wrong(where, shown)

    def dump(self, value: Any) -> str:
        return show(str(value))  # proxy passwords are never in str()

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "URL"}


class _Listed(ListOf):
    """A list of at least one value: an empty one would match nothing."""

    def _check_list(self, value: object, where: str, shown: str) -> None:
        super()._check_list(value, where, shown)
        if not value:
            raise ConfigError(f"{where}: an empty list matches nothing (leave the key out to "
                              "match any)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Route:
    """One ``[[route]]`` table. Keys left out (None) match anything; the keys given all
    have to match, each by any of its values; ``via`` says where matching flows go."""

    name: str | None = setting("route.name", RouteName(), None, unset="its index",
                               help="shown in status, flow records and metrics")  # fmt: skip
    domains: tuple[str, ...] | None = setting(
        "route.domains", _Listed(NameRule()), None, unset="any",
        help="the flow's name (from the DNS proxy's answers to the client, or sniffed) is one "
             "of these; a flow without a known name does not match")  # fmt: skip
    networks: tuple[IPNetwork, ...] | None = setting(
        "route.networks", _Listed(Network()), None, unset="any",
        help="the destination address is in one of these networks")  # fmt: skip
    ports: tuple[tuple[int, int], ...] | None = setting(
        "route.ports", _Listed(PortRange()), None, unset="any",
        help="the destination port is one of these ports or ranges")  # fmt: skip
    protocols: tuple[Protocol, ...] | None = setting(
        "route.protocols", _Listed(Choice(*PROTOCOLS)), None, unset="both",
        help="tcp, udp")  # fmt: skip
    clients: tuple[IPNetwork, ...] | None = setting(
        "route.clients", _Listed(Network()), None, unset="any",
        help="the client's address is in one of these networks")  # fmt: skip
    via: RouteVia = setting("route.via", ViaUrl(), Direct(),
                            help="where matching flows go")  # fmt: skip
    sniff: bool = setting(
        "route.sniff", Boolean(), False,
        help="TCP: when the flow's name does not match `domains`, accept the connection, read "
             "the TLS SNI or HTTP Host, then decide")  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self, self._across)

    def _across(self) -> Iterator[tuple[str, str]]:
        tcp_only = self.protocols is not None and set(self.protocols) == {"tcp"}
        if isinstance(self.via, HttpProxy | CustomVia) and not tcp_only:
            what = "an HTTP CONNECT proxy" if isinstance(self.via, HttpProxy) else "a custom via"
            yield (f'route.via: {what} carries TCP only: add protocols = ["tcp"] (UDP flows '
                   "then go on to the next route)", "Route.via")  # fmt: skip
        if self.sniff and self.domains is None:
            yield ("route.sniff: needs domains (sniffing reads a name to match them)",
                   "Route.sniff")  # fmt: skip
        if self.sniff and self.protocols is not None and "tcp" not in self.protocols:
            yield ("route.sniff: sniffing reads a TCP client's first bytes; this route has no "
                   "tcp", "Route.sniff")  # fmt: skip

    @property
    def match_keys(self) -> tuple[str, ...]:
        """The match keys given (none: the route matches every flow)."""
        return tuple(key for key in ROUTE_MATCH_KEYS if getattr(self, key) is not None)


#: (key, field name) of every route key, in the order of the docs and ``--print``.
ROUTE_KEYS: tuple[tuple[str, str], ...] = tuple(
    (spec.key, field.name) for field in dataclasses.fields(Route)
    if (spec := spec_of(field)) is not None)  # fmt: skip
ROUTE_MATCH_KEYS = ("domains", "networks", "ports", "protocols", "clients")
_SPECS = {spec.key: (field.name, spec) for field in dataclasses.fields(Route)
          if (spec := spec_of(field)) is not None}  # fmt: skip
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Route)}


def parse_routes(raw: object, base: Path | None) -> tuple[tuple[Route, ...], list[str]]:
    """The file's ``route`` value (a list of tables) as Routes, and every problem found, each
    naming its key path with the table's index."""
    routes, indexes, problems = parse_tables(raw, "route", _SPECS, Route, base)
    problems += name_problems(routes, indexes)
    return tuple(routes), problems


def name_problems(routes: Sequence[Route], indexes: Sequence[int] | None = None) -> list[str]:
    """Two routes with one name (their counters and flow records would be one). ``indexes``:
    each route's index in the file, when some tables were left out for errors of their own."""
    return duplicate_names("route", [route.name for route in routes], indexes)


def proxy_routes(via: Via | None) -> tuple[tuple[str, Route], ...]:
    """The catch-all routes of ``egress.proxy``, with their names: everything to ``via``; an
    HTTP proxy cannot carry UDP, so then UDP is rejected (ICMP port unreachable; tun2socks
    fails it too) rather than leaving directly, around the proxy the operator asked for."""
    if via is None:
        return ()
    if isinstance(via, HttpProxy):
        return ((PROXY_NAME, Route(protocols=("tcp",), via=via)),
                (PROXY_UDP_NAME, Route(protocols=("udp",), via=Reject())))  # fmt: skip
    return ((PROXY_NAME, Route(via=via)),)


def routes_toml(routes: Iterable[Route]) -> list[str]:
    """The ``[[route]]`` tables of ``--print``: the keys each route gives (proxy passwords
    shown as absent: put them back before loading the text)."""
    lines: list[str] = []
    for route in routes:
        lines += ["", "[[route]]"]
        for key, field in ROUTE_KEYS:
            value = getattr(route, field)
            if value == _DEFAULTS[field]:
                continue
            text = f"{key} = {_SPECS[key][1].kind.dump(value)}"
            if getattr(value, "password", None) is not None:
                text += "  # password not shown"
            lines.append(text)
    return lines
