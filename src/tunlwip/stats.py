"""The gateway's statistics: the frozen record, and the one schema every report is rendered from.

Theory of operation
-------------------
``Gateway.statistics()`` returns a ``GatewayStatistics``: a snapshot that cannot be changed
(its counter records are frozen copies, the stack's counters a read-only mapping), taken only
when asked for, so the data path keeps incrementing plain attributes and pays nothing.

Every report starts from the same status document (``control.status``), whose ``totals`` are
the record itself (``totals_document``: field names are the JSON keys). The reports read that
document by path (``"totals.udp.opened"``), never the record, so a report a client renders from a
document it received (``tunlwip status``) is the one the gateway would render itself:

- ``METRICS``: the declaration of each exported number: where it is in the document, its
  Prometheus name, kind (counter or gauge) and help. ``metric_families`` renders them;
  ``metrics.py`` only turns the families into the exposition format.
- ``STATUS_LINES`` ... ``STOP_LINE``: the human reports as templates whose fields are paths
  into the same document; ``status_lines`` (the counters block of ``tunlwip status``) and
  ``stop_lines`` (what ``tunlwip up`` logs when it stops) fill them with one formatter.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .admission import RefusedCounters
from .dns.counters import DnsCounters
from .dns.split import DnsRouteStatistics
from .egress.routes import RouteStatistics
from .flows import FlowTotals
from .icmp import EchoCounters
from .stack import StackStatistics
from .udp import UdpCounters

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "DNS_STATUS_LINE",
    "DNS_STOP_LINE",
    "METRICS",
    "STATUS_LINES",
    "STOP_LINE",
    "WORKER_METRICS",
    "Family",
    "Fields",
    "GatewayStatistics",
    "Stat",
    "frozen_copy",
    "gauge_paths",
    "human_bytes",
    "human_duration",
    "metric_families",
    "route_lines",
    "status_lines",
    "stop_lines",
    "totals_document",
]


@dataclasses.dataclass(frozen=True)
class GatewayStatistics:
    """A snapshot of every counter of the gateway (``Gateway.statistics()``), frozen all the
    way down: the counter records are ``frozen_copy``s, ``stack.counters`` is read-only."""

    stack: StackStatistics
    active_flows: int
    pending_dials: int
    dials_ok: int
    dials_refused: int
    dials_failed: int
    syn_retransmits_swallowed: int
    udp_sessions: int
    udp: UdpCounters
    icmp_echo: EchoCounters
    dns: DnsCounters | None
    #: Seconds since ``serve`` started (0 before).
    uptime: float = 0.0
    flows: FlowTotals = dataclasses.field(default_factory=FlowTotals)
    refused: RefusedCounters = dataclasses.field(default_factory=RefusedCounters)
    #: Per-route counters (``RouteTable.statistics()``); None while no route table runs.
    routes: RouteStatistics | None = None
    #: Per-DNS-route counters (``SplitUpstreams.statistics()``): the ``[[dns.route]]``s and
    #: the default upstreams (``default``); None when the DNS proxy is off.
    dns_routes: DnsRouteStatistics | None = None


# -- frozen snapshots of live counters --------------------------------------------------------

C = TypeVar("C", bound="DataclassInstance")
_frozen_classes: dict[type, type] = {}


def _refuse(self: object, *args: object) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot change a snapshot of {type(self).__name__}")


def frozen_copy(counters: C) -> C:
    """A copy of the counters dataclass ``counters`` (``UdpCounters`` ...) that refuses every
    assignment (``dataclasses.FrozenInstanceError``).

    Why a subclass rather than frozen counter classes: the live counters are incremented in
    place on the data path (``counters.opened += 1``); freezing those would cost a new object
    per increment. The subclass keeps the class's name, fields, ``repr`` and ``isinstance``;
    ``dataclasses.replace`` on it makes another frozen copy."""
    base = type(counters)
    frozen = _frozen_classes.get(base)
    if frozen is None:

        def init(self: object, **values: object) -> None:
            for name, value in values.items():
                object.__setattr__(self, name, value)

        def eq(self: object, other: object) -> Any:
            # Equal to a live record (or another snapshot) of the same class with the same
            # values, as the dataclass's own __eq__ would be between two live records.
            if not isinstance(other, base):
                return NotImplemented
            return _values(self) == _values(other)

        def reduce(self: object) -> tuple[object, tuple[object]]:
            # Pickled and deep-copied as a snapshot of a live record (the class is made here).
            return frozen_copy, (base(**_values(self)),)

        frozen = type(base.__name__, (base,), {"__init__": init, "__setattr__": _refuse,
                                               "__delattr__": _refuse, "__eq__": eq,
                                               "__hash__": None, "__reduce__": reduce,
                                               "__qualname__": base.__qualname__,
                                               "__module__": base.__module__})  # fmt: skip
        _frozen_classes[base] = frozen
    copy: C = frozen(**_values(counters))
    return copy


def _values(record: Any) -> dict[str, Any]:
    return {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}


# -- the status document ----------------------------------------------------------------------


def totals_document(stats: GatewayStatistics) -> dict[str, Any]:
    """``stats`` as plain JSON-ready data (the status document's ``totals``): every record a
    dict of its fields, in their order."""
    return _plain(stats)  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name))
                for field in dataclasses.fields(value)}  # fmt: skip
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _find(document: Mapping[str, Any] | None, path: str) -> Any:
    """The value at ``path`` ("totals.udp.opened") in ``document``; None where it is missing."""
    value: Any = document
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


# -- the schema of the exported numbers -------------------------------------------------------

Kind = Literal["counter", "gauge"]
_MISSING = math.nan  # a number the document lacks exports as NaN, never as a made-up 0


@dataclasses.dataclass(frozen=True)
class Stat:
    """One number of the status document, exported as one Prometheus sample.

    Consecutive stats with the same ``metric`` are the samples of one family, told apart by
    ``label`` (name, value)."""

    path: str
    metric: str
    kind: Kind
    help: str
    label: tuple[str, str] | None = None
    #: What a missing number exports as (labelled families have always said 0).
    missing: float = _MISSING


@dataclasses.dataclass(frozen=True)
class Fields:
    """Every number of one record of the status document (``UdpCounters``, the stack's
    counters ...), named by its field: nothing if the record is missing or None.

    With ``label``: one family ``metric`` with a sample per field, the field name (without
    ``prefix``) as the label's value, in sorted order. Without: a family ``metric_FIELD`` per
    field. ``help`` is formatted with ``{name}`` (the field) and ``{words}`` (its words).
    ``prefix`` keeps only the fields it starts; ``exclude`` drops those it starts. ``gauges``
    names fields that are current values (help text each), not totals."""

    path: str
    metric: str
    kind: Kind
    help: str
    label: str | None = None
    prefix: str = ""
    exclude: str | None = None
    gauges: Mapping[str, str] = dataclasses.field(default_factory=dict)


#: Stack counters that are gauges (kept by the C side as current values, not totals).
_STACK_GAUGES = MappingProxyType({
    "listeners": "catch-all TCP listeners lwIP holds now",
    "udp_ports": "catch-all UDP PCBs lwIP holds now",
    "tcp_half_open": "connections in SYN_RCVD now",
    "input_offloads": "TUN_F_* offloads the device negotiated (TUNSETOFFLOAD)",
    "c_dialing": "upstream connects C runs now for held SYNs",
    "c_dial_connected": "upstreams C connected, waiting for their client's handshake",
    "c_relays": "relays C opened for its own dials, open now",
    "c_socks5_dialing": "dials C runs now through a SOCKS5 proxy (connect and handshake)",
})  # fmt: skip

#: Every exported number, in the order of the exposition (after ``tunlwip_info``).
METRICS: tuple[Stat | Fields, ...] = (
    Stat("uptime", "uptime_seconds", "gauge", "seconds since the gateway started"),
    Stat("totals.flows.tcp", "flows", "counter", "flows opened since start",
         ("protocol", "tcp"), missing=0),
    Stat("totals.flows.udp", "flows", "counter", "flows opened since start",
         ("protocol", "udp"), missing=0),
    Stat("totals.flows.live_tcp", "open_flows", "gauge", "flows open now",
         ("protocol", "tcp"), missing=0),
    Stat("totals.flows.live_udp", "open_flows", "gauge", "flows open now",
         ("protocol", "udp"), missing=0),
    Stat("totals.flows.records_dropped", "flow_records_dropped", "counter",
         "flow records a slow subscriber did not get"),
    Stat("totals.dials_ok", "dials", "counter", "upstream connects by result",
         ("result", "ok"), missing=0),
    Stat("totals.dials_refused", "dials", "counter", "upstream connects by result",
         ("result", "refused"), missing=0),
    Stat("totals.dials_failed", "dials", "counter", "upstream connects by result",
         ("result", "failed"), missing=0),
    Stat("totals.pending_dials", "pending_dials", "gauge",
         "SYNs held while their upstream connect runs"),
    Stat("totals.syn_retransmits_swallowed", "syn_retransmits_swallowed", "counter",
         "client SYN retransmits swallowed while dialing"),
    Stat("totals.udp_sessions", "udp_sessions", "gauge", "UDP sessions open now"),
    Fields("totals.udp", "udp", "counter", "UDP sessions and datagrams: {words}"),
    Fields("totals.icmp_echo", "icmp_echo", "counter", "forwarded ICMP echo: {words}"),
    Fields("totals.dns", "dns", "counter", "DNS proxy: {words}"),
    Fields("totals.refused", "refused", "counter", "new flows turned away at a limit",
           label="reason"),
    Fields("totals.stack.counters", "drops", "counter", "client packets dropped",
           label="reason", prefix="drop_"),
    Fields("totals.stack.counters", "stack", "counter",
           "stack counter {name} (docs/architecture.md)", exclude="drop_",
           gauges=_STACK_GAUGES),
    Stat("totals.stack.tcp_connections", "tcp_connections", "gauge",
         "TCP connections the stack holds now"),
    Stat("totals.stack.lwip_tcp_pcbs", "lwip_tcp_pcbs", "gauge", "TCP PCBs lwIP holds now"),
    Fields("totals.routes.flows_tcp", "route_flows_tcp", "counter",
           "TCP flows each route took", label="route"),
    Fields("totals.routes.flows_udp", "route_flows_udp", "counter",
           "UDP sessions each route took", label="route"),
    Fields("totals.routes.rejected", "route_rejected", "counter",
           "flows each reject route refused", label="route"),
    Fields("totals.routes.dropped", "route_dropped", "counter",
           "flows each drop route dropped", label="route"),
    Fields("totals.routes.proxy_failures", "route_proxy_failures", "counter",
           "flows whose proxy failed, by route", label="route"),
    Fields("totals.dns_routes.queries", "split_dns_queries", "counter",
           "DNS queries each dns route took (default: the default upstreams)",
           label="dns_route"),
    Fields("totals.dns_routes.forwarded", "split_dns_forwarded", "counter",
           "DNS queries each dns route's upstreams answered", label="dns_route"),
    Fields("totals.dns_routes.failures", "split_dns_failures", "counter",
           "DNS queries answered SERVFAIL because a dns route's upstreams failed",
           label="dns_route"),
    Fields("totals.dns_routes.proxy_failures", "split_dns_proxy_failures", "counter",
           "upstream connections a dns route's proxy failed to open", label="dns_route"),
    Stat("process.rss_bytes", "resident_memory_bytes", "gauge",
         "resident memory of the gateway process"),
    Stat("process.open_files", "open_files", "gauge", "file descriptors the gateway holds"),
    Stat("process.open_files_limit", "open_files_limit", "gauge", "its soft RLIMIT_NOFILE"),
)  # fmt: skip


#: The supervisor's numbers (``--workers N``): exported only when the document has a
#: ``supervisor`` record, so one process's exposition is unchanged. Per worker, its open flows
#: (``worker_open_flows{worker="0"}``) and restarts follow.
WORKER_METRICS: tuple[Stat, ...] = (
    Stat("supervisor.workers_running", "workers", "gauge", "worker processes serving now"),
    Stat("supervisor.worker_restarts", "worker_restarts", "counter",
         "workers started again after they ended unexpectedly"),
    Stat("supervisor.flows_lost", "worker_flows_lost", "counter",
         "flows open in a worker when it ended unexpectedly (its last report)"),
)  # fmt: skip

#: Numbers of the totals that are current values but not exported as gauges.
_UNEXPORTED_GAUGES = ("totals.active_flows", "totals.flows.subscribers")


def gauge_paths() -> frozenset[str]:
    """The document paths of every gauge (a current value, not a total): what a merge of
    several workers' documents must not carry over from a worker that has ended."""
    paths = set(_UNEXPORTED_GAUGES)
    for entry in METRICS:
        if isinstance(entry, Stat) and entry.kind == "gauge":
            paths.add(entry.path)
        elif isinstance(entry, Fields):
            paths.update(f"{entry.path}.{name}" for name in entry.gauges)
    return frozenset(paths)


@dataclasses.dataclass
class Family:
    """One metric family to export: ``samples`` are (label value or None, value)."""

    metric: str
    kind: Kind
    help: str
    label: str | None = None
    samples: list[tuple[str | None, float]] = dataclasses.field(default_factory=list)


def metric_families(document: Mapping[str, Any]) -> Iterator[Family]:
    """The families ``METRICS`` declares, with their values from a status document."""
    current: Family | None = None
    for entry in METRICS:
        if isinstance(entry, Fields):
            if current is not None:
                yield current
                current = None
            yield from _field_families(entry, _find(document, entry.path))
            continue
        if current is not None and current.metric != entry.metric:
            yield current
            current = None
        if current is None:
            label = entry.label[0] if entry.label else None
            current = Family(entry.metric, entry.kind, entry.help, label)
        value = _find(document, entry.path)
        current.samples.append((entry.label[1] if entry.label else None,
                                entry.missing if value is None else float(value)))  # fmt: skip
    if current is not None:
        yield current
    if isinstance(document.get("supervisor"), Mapping):
        yield from _worker_families(document)


def _worker_families(document: Mapping[str, Any]) -> Iterator[Family]:
    for stat in WORKER_METRICS:
        value = _find(document, stat.path)
        yield Family(stat.metric, stat.kind, stat.help, None,
                     [(None, stat.missing if value is None else float(value))])  # fmt: skip
    workers = [w for w in document.get("workers") or () if isinstance(w, Mapping)]
    for metric, kind, key, text in (
        ("worker_open_flows", "gauge", "flows_live", "flows open now, by worker"),
        ("worker_restarts_by_worker", "counter", "restarts", "restarts, by worker"),
    ):
        family = Family(metric, kind, text, "worker")  # type: ignore[arg-type]
        for worker in workers:
            value = worker.get(key)
            family.samples.append((str(worker.get("index")),
                                   _MISSING if value is None else float(value)))  # fmt: skip
        yield family


def _field_families(fields: Fields, record: Mapping[str, Any] | None) -> Iterator[Family]:
    values = {name.removeprefix(fields.prefix): value for name, value in (record or {}).items()
              if name.startswith(fields.prefix)
              and not (fields.exclude and name.startswith(fields.exclude))}  # fmt: skip
    if fields.label is not None:
        family = Family(fields.metric, fields.kind, fields.help, fields.label)
        for name, value in sorted(values.items()):
            family.samples.append((name, _MISSING if value is None else float(value)))
        yield family
        return
    if record is None:
        return
    for name, value in values.items():
        kind: Kind = "gauge" if name in fields.gauges else fields.kind
        text = fields.gauges.get(name) or fields.help.format(
            name=name, words=name.replace("_", " ")
        )
        yield Family(f"{fields.metric}_{name}", kind, text, None,
                     [(None, _MISSING if value is None else float(value))])  # fmt: skip


# -- the human reports ------------------------------------------------------------------------
#
# Each line is a template whose fields are paths into the totals document, as in METRICS
# ("{udp.opened}"; "{dns.cache_hits+dns.replayed}" is a sum), filled by ``_fill``. Only what is
# not one number (lists of nonzero counters, the process) is built by code.

#: What ``tunlwip up`` logs when it stops; ``{grace}`` and ``{drops}`` are given.
STOP_LINE = (
    "stopped{grace}: dials ok {dials_ok} refused {dials_refused} failed {dials_failed}; udp "
    "sessions {udp.opened} expired {udp.expired} evicted {udp.evicted}; quic rejected "
    "{stack.counters.udp_port_rejected}; echo replied {stack.counters.icmp_echo_replied} "
    "forwarded {stack.counters.icmp_echo_forwarded}; packets in {stack.counters.packets_in} out "
    "{stack.counters.packets_out} (GSO writes {stack.counters.output_gso_writes} carried "
    "{stack.counters.output_segments_coalesced} more, {stack.counters.output_gso_udp_writes} of "
    "UDP); drops {drops}; offloaded in: "
    "{stack.counters.input_gso_tcp} TCP super-segments, {stack.counters.input_gso_udp} UDP "
    "super-datagrams"
)
#: ... and then, if the DNS proxy ran.
DNS_STOP_LINE = (
    "dns: queries {dns.queries} blocked {dns.blocked} overridden {dns.overridden} cached "
    "{dns.cache_hits+dns.replayed} (replayed {dns.replayed}) forwarded {dns.forwarded} failed "
    "{dns.upstream_failures} (timeouts {dns.timeouts}) truncated {dns.truncated} malformed "
    "{dns.malformed+dns.formerr}; blocked by cname {dns.blocked_cname}; tcp deadline resets "
    "{dns.tcp_timeouts}; encrypted dns refused {refused.encrypted_dns}"
)
#: The first lines of the counters block of ``tunlwip status``; ``{echo_details}`` is given.
STATUS_LINES = (
    "flows:     {flows.live_tcp} TCP and {flows.live_udp} UDP open; {flows.tcp} TCP, "
    "{flows.udp} UDP since start",
    "dials:     ok {dials_ok}, refused {dials_refused}, failed {dials_failed}, pending "
    "{pending_dials}",
    "udp:       sessions {udp.opened} opened, {udp.expired} expired, {udp.evicted} evicted; "
    "datagrams {udp.datagrams_in} in, {udp.datagrams_out} out",
    "icmp echo: replied {stack.counters.icmp_echo_replied}, forwarded "
    "{stack.counters.icmp_echo_forwarded}{echo_details}",
)
DNS_STATUS_LINE = (
    "dns:       queries {dns.queries}, blocked {dns.blocked}, cached "
    "{dns.cache_hits+dns.replayed}, forwarded {dns.forwarded}, failed {dns.upstream_failures} "
    "(timeouts {dns.timeouts})"
)


class _Filler(string.Formatter):
    """Fills a template's fields from a document: a field is a dotted path, or paths joined by
    "+" (their sum), or one of the values given by name; a number the document lacks is 0."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document

    def get_field(self, field_name: str, args: Any, kwargs: Mapping[str, Any]) -> Any:
        if field_name in kwargs:
            return kwargs[field_name], field_name
        values = [_find(self.document, path) for path in field_name.split("+")]
        return sum(value or 0 for value in values), field_name


def _fill(template: str, document: Mapping[str, Any], **given: Any) -> str:
    return _Filler(document).vformat(template, (), given)


def _counts(document: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The record at ``path``, empty where it is missing (a report then says none)."""
    return _find(document, path) or {}


def _dropped(counters: Mapping[str, Any]) -> dict[str, int]:
    """The nonzero ``drop_*`` counters by reason (as ``StackStatistics.dropped``)."""
    return {k[5:]: v for k, v in counters.items() if k.startswith("drop_") and v}


def _spaced(name: str) -> str:
    return name.replace("_", " ")


def status_lines(document: Mapping[str, Any]) -> list[str]:
    """The counters block of ``tunlwip status``: flows, dials, UDP, echo, DNS, refusals,
    shares, the process and the drops, one line each."""
    totals = _counts(document, "totals")
    echo = _counts(totals, "icmp_echo")
    echo_details = "".join(f", {_spaced(k)} {v}" for k, v in echo.items() if v)
    lines = [_fill(line, totals, echo_details=echo_details) for line in STATUS_LINES]
    lines[2:2] = route_lines(_counts(totals, "routes"))
    if isinstance(supervisor := document.get("supervisor"), Mapping):
        lines.insert(0, _workers_line(supervisor, document.get("workers") or []))
    dns = totals.get("dns")
    lines.append(_fill(DNS_STATUS_LINE, totals) if dns else "dns:       proxy off")
    if dns and (split := _dns_routes_line(_counts(totals, "dns_routes"))):
        lines.append(split)
    share_prefix = "client_share_"
    all_refused = _counts(totals, "refused").items()
    refused = {_spaced(k): v for k, v in all_refused if v and not k.startswith(share_prefix)}
    refused["udp sessions"] = _counts(totals, "udp").get("refused_full", 0)
    refused["dns in flight"] = (dns or {}).get("overload", 0)
    at_limits = ", ".join(f"{k} {v}" for k, v in refused.items() if v)
    lines.append(f"refused:   {at_limits or 'none'}")
    # Refused because one client held its share of a budget that had room (``shares``).
    at_shares = ", ".join(f"{_spaced(k.removeprefix(share_prefix))} {v}"
                          for k, v in all_refused if v and k.startswith(share_prefix))  # fmt: skip
    lines.append(f"shares:    {'refused ' + at_shares if at_shares else 'none refused'}")
    process = _counts(document, "process")
    if process.get("rss_bytes") is not None:
        limit = process.get("open_files_limit") or "unlimited"
        lines.append(f"process:   rss {human_bytes(process['rss_bytes'])}, open files "
                     f"{process.get('open_files', '?')} of {limit}")  # fmt: skip
    drops = _counts(document, "drops")
    dropped = ", ".join(f"{_spaced(k)} {v}" for k, v in sorted(drops.items()))
    lines.append(f"drops:     {dropped or 'none'}")
    return lines


#: A route's counters in ``tunlwip status``: (key in ``totals.routes``, label).
_ROUTE_COUNTERS = (("flows_tcp", "tcp"), ("flows_udp", "udp"), ("rejected", "rejected"),
                   ("dropped", "dropped"), ("proxy_failures", "proxy failures"))  # fmt: skip


def route_lines(routes: Mapping[str, Any]) -> list[str]:
    """One line per route, with its via (no password: ``RouteStatistics.via``) and counters,
    when the table has routes of its own (not only the implicit ``default``)."""
    vias = routes.get("via") or {}
    if list(vias.items()) in ([], [("default", "direct")]):
        return []
    lines = []
    for name, via in vias.items():
        counts = ", ".join(f"{label} {(routes.get(key) or {}).get(name, 0)}"
                           for key, label in _ROUTE_COUNTERS)  # fmt: skip
        lines.append(f"route:     {name} via {via}: {counts}")
    return lines


def _dns_routes_line(routes: Mapping[str, Any]) -> str | None:
    """``split dns: corp 12 (failed 1, proxy failed 1), default 40``: queries per DNS route
    and how many failed; None without ``[[dns.route]]`` tables (``default`` alone)."""
    queries = routes.get("queries") or {}
    if len(queries) < 2:
        return None
    failures, proxy = routes.get("failures") or {}, routes.get("proxy_failures") or {}
    parts = []
    for name, count in queries.items():
        failed = [f"failed {failures[name]}"] if failures.get(name) else []
        failed += [f"proxy failed {proxy[name]}"] if proxy.get(name) else []
        parts.append(f"{name} {count}" + (f" ({', '.join(failed)})" if failed else ""))
    return "split dns: " + ", ".join(parts)


def _workers_line(supervisor: Mapping[str, Any], workers: list[Any]) -> str:
    """``workers:   2 of 2 running (open flows 3, 4; restarts 0, 1); 5 flows lost``."""
    each = [w for w in workers if isinstance(w, Mapping)]
    flows = ", ".join(str(w.get("flows_live", "?")) for w in each)
    restarts = ", ".join(str(w.get("restarts", 0)) for w in each)
    return (f"workers:   {supervisor.get('workers_running', '?')} of "
            f"{supervisor.get('workers', '?')} running (open flows {flows}; restarts "
            f"{restarts}); {supervisor.get('flows_lost', 0)} flows lost")  # fmt: skip


def stop_lines(totals: Mapping[str, Any], *, drained: bool) -> list[str]:
    """What ``tunlwip up`` logs when it stops (``totals``: ``totals_document``): dials, UDP,
    echo, packets and drops; then the DNS proxy's counters, if it ran."""
    drops = _dropped(_counts(totals, "stack.counters")) or "none"
    grace = "" if drained else " (grace period over, flows reset)"
    lines = [_fill(STOP_LINE, totals, grace=grace, drops=drops)]
    if totals.get("dns") is not None:
        lines.append(_fill(DNS_STOP_LINE, totals))
    return lines


def human_bytes(value: Any) -> str:
    """``value`` bytes in B, KiB, MiB ... (one decimal above bytes)."""
    amount = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{int(amount)} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(value: Any) -> str:
    """``value`` seconds as 3d04h05m, 4h05m06s, 5m06s or 6s."""
    seconds = int(float(value or 0))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"
