"""The ``[[dns.route]]`` tables (split DNS): one ``DnsRoute`` struct per table, its keys, rules
and file form.

Theory of operation
-------------------
As for ``[[route]]`` (``config.routes``): the keys are declared on the fields of the frozen
``DnsRoute`` struct with the key path ``dns.route.KEY``, ``__post_init__`` runs their rules
and the rules between them, so an embedder's ``DnsRoute(...)`` and a file's table meet the
same checks; ``parse_dns_routes`` reads the file's list with the table's index in every key
path (``dns.route[1].upstreams[0]: not a valid upstream URL: ...``), ``dns_routes_toml``
writes it back for ``--print``. ``domains`` and ``upstreams`` are required: a DNS route
without either would never be what was meant.

What the proxy does with them is ``dns.split``; how a ``via`` reaches an upstream is
``dns.upstream_via``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..dns.split import DEFAULT_ROUTE
from ..dns.upstream_via import via_problem
from ..egress.via import Via
from ..errors import ConfigError
from .fields import check_fields, setting, spec_of
from .kinds import ListOf, UpstreamUrl
from .routes import NameRule, RouteName, ViaUrl
from .tables import duplicate_names, parse_tables

__all__ = ["DNS_ROUTE_KEYS", "DnsRoute", "dns_route_problems", "dns_routes_toml",
           "parse_dns_routes"]  # fmt: skip


class DnsRouteName(RouteName):
    """A DNS route's name: shown in status and metrics' ``dns_route`` label."""

    def check(self, value: Any, where: str, shown: str) -> None:
        if value == DEFAULT_ROUTE:
            raise ConfigError(f"{where}: {shown} is reserved (the default upstreams' name)")
        if isinstance(value, str) and value in ("proxy", "proxy-udp"):
            return  # reserved among [[route]]s only
        super().check(value, where, shown)


class _Required(ListOf):
    """A list of at least one value."""

    def _check_list(self, value: object, where: str, shown: str) -> None:
        super()._check_list(value, where, shown)
        if not value:
            raise ConfigError(f"{where}: an empty list (give at least one)")


@dataclasses.dataclass(frozen=True)
class DnsRoute:
    """One ``[[dns.route]]`` table: queries for ``domains`` go to ``upstreams`` only, reached
    by way of ``via``."""

    name: str | None = setting("dns.route.name", DnsRouteName(), None, unset="its index",
                               help="shown in status and metrics")  # fmt: skip
    domains: tuple[str, ...] | None = setting(
        "dns.route.domains", _Required(NameRule()), None, unset="required",
        help="queries for these names (the DNS lists' syntax) take this route")  # fmt: skip
    upstreams: tuple[str, ...] | None = setting(
        "dns.route.upstreams", _Required(UpstreamUrl()), None, unset="required",
        help="its upstreams, tried in order")  # fmt: skip
    via: Via | None = setting("dns.route.via", ViaUrl(), None, unset="direct",
                              help="how its upstreams are reached")  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self, self._across)

    def _across(self) -> Iterator[tuple[str, str]]:
        for key in ("domains", "upstreams"):
            if getattr(self, key) is None:
                yield f"dns.route.{key}: required", f"DnsRoute.{key}"
        if self.via is not None and self.upstreams is not None:
            problem = via_problem(self.via, self.upstreams)
            if problem is not None:
                key, reason = problem
                yield f"dns.route.{key}: {reason}", f"DnsRoute.{key.partition('[')[0]}"


#: (key, field name) of every DNS route key, in the order of the docs and ``--print``.
DNS_ROUTE_KEYS: tuple[tuple[str, str], ...] = tuple(
    (spec.key.removeprefix("route."), field.name) for field in dataclasses.fields(DnsRoute)
    if (spec := spec_of(field)) is not None)  # fmt: skip
_SPECS = {spec.key.removeprefix("route."): (field.name, spec)
          for field in dataclasses.fields(DnsRoute)
          if (spec := spec_of(field)) is not None}  # fmt: skip


def parse_dns_routes(raw: object, base: Path | None) -> tuple[tuple[DnsRoute, ...], list[str]]:
    """The file's ``dns.route`` value (a list of tables) as DnsRoutes, and every problem
    found, each naming its key path with the table's index."""
    routes, indexes, problems = parse_tables(raw, "dns.route", _SPECS, DnsRoute, base)
    problems += dns_route_problems(routes, indexes)
    return tuple(routes), problems


def dns_route_problems(routes: Sequence[DnsRoute],
                       indexes: Sequence[int] | None = None) -> list[str]:  # fmt: skip
    """Two DNS routes with one name (their counters would be one). ``indexes``: each route's
    table index in the file (default: its position)."""
    return duplicate_names("dns.route", [route.name for route in routes], indexes)


def dns_routes_toml(routes: Iterable[DnsRoute]) -> list[str]:
    """The ``[[dns.route]]`` tables of ``--print`` (proxy passwords shown as absent)."""
    lines: list[str] = []
    for route in routes:
        lines += ["", "[[dns.route]]"]
        for key, field in DNS_ROUTE_KEYS:
            value = getattr(route, field)
            if value is None:
                continue
            text = f"{key} = {_SPECS[key][1].kind.dump(value)}"
            if getattr(value, "password", None) is not None:
                text += "  # password not shown"
            lines.append(text)
    return lines
