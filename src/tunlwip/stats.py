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
- ``status_lines``: the counters block of ``tunlwip status``.
- ``stop_lines``: the "stopped" (and "dns:") lines ``tunlwip up`` logs when it stops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .admission import RefusedCounters
from .dns.proxy import DnsCounters
from .flows import FlowTotals
from .icmp import EchoCounters
from .stack import StackStatistics
from .udp import UdpCounters

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "METRICS",
    "Family",
    "Fields",
    "GatewayStatistics",
    "Stat",
    "frozen_copy",
    "human_bytes",
    "human_duration",
    "metric_families",
    "status_lines",
    "stop_lines",
    "totals_document",
]


@dataclasses.dataclass(frozen=True)
class GatewayStatistics:
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

        frozen = type(base.__name__, (base,), {"__init__": init, "__setattr__": _refuse,
                                               "__delattr__": _refuse,
                                               "__qualname__": base.__qualname__,
                                               "__module__": base.__module__})  # fmt: skip
        _frozen_classes[base] = frozen
    values = {field.name: getattr(counters, field.name) for field in dataclasses.fields(counters)}
    copy: C = frozen(**values)
    return copy


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
    Stat("process.rss_bytes", "resident_memory_bytes", "gauge",
         "resident memory of the gateway process"),
    Stat("process.open_files", "open_files", "gauge", "file descriptors the gateway holds"),
    Stat("process.open_files_limit", "open_files_limit", "gauge", "its soft RLIMIT_NOFILE"),
)  # fmt: skip


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


def _counts(document: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The record at ``path``, empty where it is missing (a report then says 0)."""
    return _find(document, path) or {}


def _dropped(counters: Mapping[str, Any]) -> dict[str, int]:
    """The nonzero ``drop_*`` counters by reason (as ``StackStatistics.dropped``)."""
    return {k[5:]: v for k, v in counters.items() if k.startswith("drop_") and v}


def status_lines(document: Mapping[str, Any]) -> list[str]:
    """The counters block of ``tunlwip status``: flows, dials, UDP, echo, DNS, refusals,
    shares, the process and the drops, one line each."""
    totals = _counts(document, "totals")
    flows = _counts(totals, "flows")
    lines = [f"flows:     {flows.get('live_tcp', 0)} TCP and {flows.get('live_udp', 0)} "
             f"UDP open; {flows.get('tcp', 0)} TCP, {flows.get('udp', 0)} UDP since "
             "start"]  # fmt: skip
    lines.append(f"dials:     ok {totals.get('dials_ok', 0)}, refused "
                 f"{totals.get('dials_refused', 0)}, failed {totals.get('dials_failed', 0)}, "
                 f"pending {totals.get('pending_dials', 0)}")  # fmt: skip
    udp = _counts(totals, "udp")
    lines.append(f"udp:       sessions {udp.get('opened', 0)} opened, {udp.get('expired', 0)} "
                 f"expired, {udp.get('evicted', 0)} evicted; datagrams "
                 f"{udp.get('datagrams_in', 0)} in, {udp.get('datagrams_out', 0)} out")  # fmt: skip
    counters = _counts(totals, "stack.counters")
    echo = _counts(totals, "icmp_echo")
    echo_details = "".join(f", {k.replace('_', ' ')} {v}" for k, v in echo.items() if v)
    lines.append(f"icmp echo: replied {counters.get('icmp_echo_replied', 0)}, forwarded "
                 f"{counters.get('icmp_echo_forwarded', 0)}{echo_details}")  # fmt: skip
    dns = totals.get("dns")
    if dns:
        cached = dns.get("cache_hits", 0) + dns.get("replayed", 0)
        lines.append(f"dns:       queries {dns.get('queries', 0)}, blocked "
                     f"{dns.get('blocked', 0)}, cached {cached}, forwarded "
                     f"{dns.get('forwarded', 0)}, failed {dns.get('upstream_failures', 0)} "
                     f"(timeouts {dns.get('timeouts', 0)})")  # fmt: skip
    else:
        lines.append("dns:       proxy off")
    share_prefix = "client_share_"
    all_refused = _counts(totals, "refused").items()
    refused = {k.replace("_", " "): v for k, v in all_refused
               if v and not k.startswith(share_prefix)}  # fmt: skip
    refused["udp sessions"] = udp.get("refused_full", 0)
    refused["dns in flight"] = (dns or {}).get("overload", 0)
    at_limits = ", ".join(f"{k} {v}" for k, v in refused.items() if v)
    lines.append(f"refused:   {at_limits or 'none'}")
    # Refused because one client held its share of a budget that had room (``shares``).
    at_shares = ", ".join(f"{k[len(share_prefix):].replace('_', ' ')} {v}"
                          for k, v in all_refused if v and k.startswith(share_prefix))  # fmt: skip
    lines.append(f"shares:    {'refused ' + at_shares if at_shares else 'none refused'}")
    process = _counts(document, "process")
    if process.get("rss_bytes") is not None:
        limit = process.get("open_files_limit") or "unlimited"
        lines.append(f"process:   rss {human_bytes(process['rss_bytes'])}, open files "
                     f"{process.get('open_files', '?')} of {limit}")  # fmt: skip
    drops = _counts(document, "drops")
    dropped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(drops.items()))
    lines.append(f"drops:     {dropped or 'none'}")
    return lines


def stop_lines(totals: Mapping[str, Any], *, drained: bool) -> list[str]:
    """What ``tunlwip up`` logs when it stops (``totals``: ``totals_document``): dials, UDP,
    echo, packets and drops; then the DNS proxy's counters, if it ran."""
    c, u = _counts(totals, "stack.counters"), _counts(totals, "udp")
    lines = [f"stopped{'' if drained else ' (grace period over, flows reset)'}: dials ok "
             f"{totals['dials_ok']} refused {totals['dials_refused']} failed "
             f"{totals['dials_failed']}; udp sessions {u['opened']} expired {u['expired']} "
             f"evicted {u['evicted']}; quic rejected {c['udp_port_rejected']}; echo replied "
             f"{c['icmp_echo_replied']} forwarded {c['icmp_echo_forwarded']}; packets in "
             f"{c['packets_in']} out {c['packets_out']} (GSO writes {c['output_gso_writes']} "
             f"carried {c['output_segments_coalesced']} more); drops "
             f"{_dropped(c) or 'none'}"]  # fmt: skip
    d = totals.get("dns")
    if d is not None:
        lines.append(f"dns: queries {d['queries']} blocked {d['blocked']} overridden "
                     f"{d['overridden']} cached {d['cache_hits'] + d['replayed']} (replayed "
                     f"{d['replayed']}) forwarded {d['forwarded']} failed "
                     f"{d['upstream_failures']} (timeouts {d['timeouts']}) truncated "
                     f"{d['truncated']} malformed {d['malformed'] + d['formerr']}; blocked by "
                     f"cname {d['blocked_cname']}; tcp deadline resets {d['tcp_timeouts']}; "
                     f"encrypted dns refused {totals['refused']['encrypted_dns']}")  # fmt: skip
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
