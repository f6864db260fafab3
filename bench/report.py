"""The benchmark's results: recorded as they come (JSON lines), rendered at the end (markdown).

Why apart from run.py: run.py decides what to measure and in which order; this module only
knows records (one figure of one method in one workload at one MTU) and how to compare
them. Every figure gets its ratio to the kernel measured in the same run, and the figures of
the methods under test get their ratios to their peers measured in the same run
(COMPARISONS): tunlwip against slirp4netns, pasta and hev-socks5-tunnel + danted, and
tunlwip with two workers against tunlwip with one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from methods import METHODS
from workloads import Measurement

BASELINE = "kernel"
#: (method, its peer): a ``ratio_<peer>`` in each of the method's records, and a column.
#: METHODS puts every peer before its method, so the peer's figure exists when needed.
COMPARISONS = (
    ("tunlwip", "slirp4netns"),
    ("tunlwip", "pasta"),
    ("tunlwip", "hev"),
    ("tunlwip-w2", "tunlwip"),
    ("tunlwip-socks5", "tunlwip"),
)
COLUMN_NAMES = {("tunlwip-w2", "tunlwip"): "workers 2 ÷ 1",
                ("tunlwip-socks5", "tunlwip"): "via danted ÷ direct"}  # fmt: skip
#: Counts near zero (loss %, failed connections): a ratio of them is noise, not information.
NO_RATIO = {"loss", "failed"}
X = "\N{MULTIPLICATION SIGN}"  # escaped: ruff flags the literal as ambiguous


@dataclass
class Skip:
    method: str
    phase: str
    mtu: int
    reason: str


@dataclass
class Run:
    """Everything measured so far; written as JSON lines as it comes, as markdown at the end."""

    stamp: str
    jsonl: Path
    md: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def _value(self, method: str, m: Measurement) -> float | None:
        for r in self.records:
            key = (r["method"], r["workload"], r["metric"], r["mtu"])
            if key == (method, m.workload, m.metric, m.mtu):
                v = r["value"]
                return float(v) if v is not None else None
        return None

    def add(self, m: Measurement) -> dict[str, Any]:
        rec = asdict(m)
        ratios = m.metric not in NO_RATIO
        rec["ratio"] = (
            _ratio(m.value, self._value(BASELINE, m)) if ratios and m.method != BASELINE else None
        )
        for method, peer in COMPARISONS:
            if m.method == method:
                rec[f"ratio_{peer}"] = _ratio(m.value, self._value(peer, m)) if ratios else None
        rec["run"] = self.stamp
        self.records.append(rec)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    def skip(self, method: str, phase: str, mtu: int, reason: str) -> None:
        self.skips.append(Skip(method, phase, mtu, reason))
        rec = {
            "run": self.stamp,
            "method": method,
            "workload": phase,
            "mtu": mtu,
            "value": None,
            "skipped": reason,
        }
        with self.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"  SKIP {method:<12} {phase} @ MTU {mtu}: {reason}", flush=True)


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


# -- formatting -------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if float(v).is_integer() and a < 1e15:
        return f"{int(v):,}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01 or a == 0:
        return f"{v:.2f}".rstrip("0").rstrip(".") if a < 1 else f"{v:.2f}"
    return f"{v:.2g}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.3f}{X}" if r < 0.1 else f"{r:.2f}{X}"


def label(workload: str) -> str:
    """Human-readable row names for the machine-friendly workload ids."""
    parts = workload.split("-")
    if parts[0] == "tcp":
        d = "download" if parts[1] == "down" else "upload"
        n = parts[2]
        return f"TCP {d}, {n} stream{'s' if n != '1' else ''}, IP{parts[3]}"
    if parts[0] == "udp":
        d = "download" if parts[1] == "down" else "upload"
        return f"UDP {d}, {parts[2]}bit/s offered, 1400 B, IP{parts[3]}"
    if workload == "conn-serial":
        return "connect / 1 B / close, serial"
    if workload.startswith("conn-par"):
        return f"connect / 1 B / close, {workload[8:]} parallel"
    if workload == "rr-1byte":
        return "1-byte request/response, one connection"
    if workload == "rr-plain":
        return "1-byte request/response, plain blocking client"
    if workload == "conn-plain":
        return "connect / 1 B / close, plain blocking client, timed whole"
    if workload == "dns-cached":
        return "DNS, one name repeated (cached)"
    if workload == "dns-uncached":
        return "DNS, distinct names (uncached)"
    if workload == "rss-idle":
        return "gateway RSS, idle"
    if workload.startswith("rss-"):
        _, n, kind = parts
        what = "idle TCP connections" if kind == "tcp" else "UDP sessions"
        return f"gateway, {int(n):,} {what}"
    return workload


def render(run: Run, methods_run: list[str], interrupted: bool) -> str:
    """The markdown report: a results table and a gateway-CPU table per MTU (one column per
    method, then one per comparison), errors, what was not measured, and the targets."""
    cols = [m for m in METHODS if m in methods_run]
    out = [f"# tunlwip benchmark {run.stamp}", ""]
    if interrupted:
        out += ["**Interrupted: partial results.**", ""]
    out += [f"- {k}: {v}" for k, v in run.meta.items()]
    out += [
        "",
        f"Cells: the figure, then ({X}) its ratio to the kernel's figure in the same run. "
        "↑ higher is better, ↓ lower is better. Compare ratios, not absolute numbers, "
        "across runs.",
        "",
    ]
    mtus = sorted({r["mtu"] for r in run.records})
    for cpu in (False, True):
        for mtu in mtus:
            rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
            for r in run.records:
                if r["mtu"] != mtu or (r["metric"] == "cpu") != cpu:
                    continue
                rows.setdefault((r["workload"], r["metric"]), {})[r["method"]] = r
            if not rows:
                continue
            # Each workload's metrics together, workloads in the order they ran (the
            # CPU-per rows exist only for gateway processes, so they come later in the records).
            order = list(dict.fromkeys(w for w, _ in rows))
            rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0][0])))
            title = "Gateway CPU seconds per workload" if cpu else "Results"
            out += [f"## {title}, MTU {mtu}", ""]
            pairs = [(m, p) for m, p in COMPARISONS if m in cols and p in cols]
            head = ["workload", "metric", *cols] + [
                COLUMN_NAMES.get((m, p), f"{m} ÷ {p}") for m, p in pairs
            ]
            out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for (workload, metric), by in rows.items():
                any_r = next(iter(by.values()))
                arrow = "↑" if any_r["better"] == "higher" else "↓"
                cells = [label(workload), f"{metric} ({any_r['unit']}) {arrow}"]
                for m in cols:
                    r = by.get(m)
                    if r is None:
                        cells.append("")
                    elif r["value"] is None:
                        cells.append("error")
                    else:
                        ratio = fmt_ratio(r["ratio"]) if not cpu else ""
                        cells.append(fmt(r["value"]) + (f" ({ratio})" if ratio else ""))
                for method, peer in pairs:
                    t = by.get(method)
                    x = fmt_ratio(t.get(f"ratio_{peer}")) if t else ""
                    cells.append(f"**{x}**" if x else "")
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    errors = [r for r in run.records if r.get("error")]
    if errors:
        out += ["## Errors", ""]
        out += [
            f"- {r['method']} {r['workload']} {r['metric']} @ MTU {r['mtu']}: {r['error']}"
            for r in errors
        ]
        out.append("")
    if run.skips:
        out += ["## Not measured", ""]
        out += [f"- {s.method} {s.phase} @ MTU {s.mtu}: {s.reason}" for s in run.skips]
        out.append("")
    out += render_targets(run)
    out += render_targets_17(run)
    out += render_targets_16(run)
    return "\n".join(out)


def render_targets(run: Run) -> list[str]:
    """Issue #7's targets, checked against this run's figures."""

    def get(method: str, workload: str, metric: str, mtu: int) -> dict[str, Any] | None:
        for r in run.records:
            if (r["method"], r["workload"], r["metric"], r["mtu"]) == (
                method,
                workload,
                metric,
                mtu,
            ):
                return r
        return None

    rows: list[tuple[str, str, bool | None]] = []
    mtus = sorted({r["mtu"] for r in run.records})
    for mtu in mtus:
        for d in ("down", "up"):
            r = get("tunlwip", f"tcp-{d}-1-v4", "throughput", mtu)
            x = r["ratio_slirp4netns"] if r else None
            rows.append(
                (
                    f"TCP 1 stream {d}load IPv4, MTU {mtu}: ≥ 1.0{X} slirp4netns",
                    fmt_ratio(x) or "—",
                    None if x is None else x >= 1.0,
                )
            )
    for workload, metric, what in (
        ("conn-serial", "rate", "serial connection rate"),
        ("rr-1byte", "rate", "request/response rate"),
    ):
        r = next(
            (
                get("tunlwip", workload, metric, m)
                for m in mtus
                if get("tunlwip", workload, metric, m)
            ),
            None,
        )
        x = r["ratio_slirp4netns"] if r else None
        rows.append(
            (f"{what}: ≥ 0.8{X} slirp4netns", fmt_ratio(x) or "—", None if x is None else x >= 0.8)
        )

    def first(workload_prefix: str, metric: str) -> float | None:
        for r in run.records:
            if (
                r["method"] == "tunlwip"
                and r["workload"].startswith(workload_prefix)
                and r["metric"] == metric
                and r["value"] is not None
            ):
                return float(r["value"])
        return None

    idle = first("rss-idle", "rss")
    rows.append(("idle RSS ≤ 40 MiB", f"{fmt(idle)} MiB", None if idle is None else idle <= 40))
    per_tcp = first("rss-", "KiB per conn")
    rows.append(
        (
            "≤ 4 KiB RSS per idle TCP connection",
            f"{fmt(per_tcp)} KiB",
            None if per_tcp is None else per_tcp <= 4,
        )
    )
    per_udp = first("rss-", "KiB per session")
    rows.append(
        (
            "≤ 2 KiB RSS per UDP session",
            f"{fmt(per_udp)} KiB",
            None if per_udp is None else per_udp <= 2,
        )
    )
    qps, p99 = first("dns-cached", "qps"), first("dns-cached", "p99")
    ok = None if qps is None or p99 is None else qps >= 10_000 and p99 < 5
    rows.append(
        ("DNS cached ≥ 10,000 q/s with p99 < 5 ms", f"{fmt(qps)} q/s, p99 {fmt(p99)} ms", ok)
    )
    if all(r[2] is None for r in rows):
        return []
    out = ["## Issue #7 targets (tunlwip)", "", "| target | this run | met |", "|---|---|---|"]
    for name, got, met in rows:
        out.append(f"| {name} | {got} | {'—' if met is None else ('yes' if met else 'no')} |")
    out.append("")
    return out


def render_targets_17(run: Run) -> list[str]:
    """Issue 17's targets, checked against this run's figures: each compares tunlwip with a
    peer measured in the same run (or workers 2 with workers 1), or with a fixed figure."""

    def value(method: str, workload: str, metric: str, mtu: int | None = None) -> float | None:
        for r in run.records:
            if (r["method"], r["workload"], r["metric"]) == (method, workload, metric) and (
                mtu is None or r["mtu"] == mtu
            ):
                return None if r["value"] is None else float(r["value"])
        return None

    def vs(
        name: str, workload: str, metric: str, peers: tuple[str, ...], at_least: float,
        method: str = "tunlwip", mtu: int | None = None,
    ) -> tuple[str, str, bool | None]:  # fmt: skip
        """``method``'s figure ÷ the best of ``peers`` (all of them measured), ≥ at_least."""
        mine = value(method, workload, metric, mtu)
        theirs = [value(p, workload, metric, mtu) for p in peers]
        if mine is None or any(t is None or t == 0 for t in theirs):
            return name, "—", None
        best = max(t for t in theirs if t is not None)
        x = mine / best
        return name, f"{fmt(mine)} vs {fmt(best)}: {fmt_ratio(x)}", x >= at_least

    def fixed(
        name: str, got: float | None, ok: bool | None, unit: str
    ) -> tuple[str, str, bool | None]:
        return name, f"{fmt(got)} {unit}" if got is not None else "—", ok

    rows = [
        vs(f"serial connections ≥ 1.0{X} pasta and slirp4netns", "conn-serial", "rate",
           ("pasta", "slirp4netns"), 1.0),
        vs(f"8 parallel connections ≥ 1.0{X} pasta and slirp4netns", "conn-par8", "rate",
           ("pasta", "slirp4netns"), 1.0),
        vs(f"plain request/response ≥ 1.0{X} slirp4netns", "rr-plain", "rate",
           ("slirp4netns",), 1.0),
        vs(f"request/response (rr) ≥ 1.0{X} slirp4netns", "rr-1byte", "rate",
           ("slirp4netns",), 1.0),
    ]  # fmt: skip
    p50, peer_p50 = value("tunlwip", "rr-plain", "p50"), value("slirp4netns", "rr-plain", "p50")
    ok = None if p50 is None or peer_p50 is None else p50 <= peer_p50
    rows.append(
        fixed("plain request/response p50 ≤ slirp4netns'", p50, ok, f"µs vs {fmt(peer_p50)}")
    )
    if value("hev", "tcp-up-1-v4", "throughput", 1500) is not None:
        rows.append(vs(f"TCP upload, 1 stream, MTU 1500 ≥ 1.5{X} hev-socks5-tunnel + danted",
                       "tcp-up-1-v4", "throughput", ("hev",), 1.5, mtu=1500))  # fmt: skip
    else:
        rows.append(vs(f"TCP upload, 1 stream, MTU 1500 ≥ 5{X} slirp4netns (hev not measured)",
                       "tcp-up-1-v4", "throughput", ("slirp4netns",), 5.0, mtu=1500))  # fmt: skip
    rows += [
        vs(f"workers 2 ÷ 1: 4-stream upload ≥ 1.3{X}", "tcp-up-4-v4", "throughput",
           ("tunlwip",), 1.3, method="tunlwip-w2", mtu=1500),
        vs(f"workers 2 ÷ 1: 8 parallel connections ≥ 1.3{X}", "conn-par8", "rate",
           ("tunlwip",), 1.3, method="tunlwip-w2"),
    ]  # fmt: skip
    for d in ("up", "down"):
        rows.append(vs(f"bulk UDP {d} (3 Gbit/s offered) ≥ 1.0{X} best of slirp4netns, pasta",
                       f"udp-{d}-3G-v4", "received", ("slirp4netns", "pasta"), 1.0))  # fmt: skip
    qps, p99 = value("tunlwip", "dns-uncached", "qps"), value("tunlwip", "dns-uncached", "p99")
    ok = None if qps is None or p99 is None else qps >= 10_000 and p99 < 10
    rows.append(
        fixed("forwarded DNS ≥ 10,000 q/s, p99 < 10 ms", qps, ok, f"q/s, p99 {fmt(p99)} ms")
    )
    qps = value("tunlwip", "dns-cached", "qps")
    rows.append(
        fixed("cached DNS ≥ 25,000 q/s", qps, None if qps is None else qps >= 25_000, "q/s")
    )
    idle = value("tunlwip", "rss-idle", "rss")
    rows.append(fixed("idle RSS ≤ 32.7 MiB", idle, None if idle is None else idle <= 32.7, "MiB"))
    if all(r[2] is None for r in rows):
        return []
    out = ["## Issue 17 targets (tunlwip, same run)", "", "| target | this run | met |",
           "|---|---|---|"]  # fmt: skip
    for name, got, met in rows:
        out.append(f"| {name} | {got} | {'—' if met is None else ('yes' if met else 'no')} |")
    out.append("")
    return out


#: Issue 16's proxied rows: (what, workload, metric); each ≥ 0.8 times tunlwip direct at MTU 1500.
PROXIED_ROWS = (
    ("TCP upload, 1 stream", "tcp-up-1-v4", "throughput"),
    ("TCP download, 1 stream", "tcp-down-1-v4", "throughput"),
    ("serial connections", "conn-serial", "rate"),
    ("bulk UDP up (3 Gbit/s offered)", "udp-up-3G-v4", "received"),
    ("bulk UDP down (3 Gbit/s offered)", "udp-down-3G-v4", "received"),
)

#: The same rows' gateway CPU (per GB, per connection), proxied and direct.
GATEWAY_COST_ROWS = (
    ("TCP upload, 1 stream", "tcp-up-1-v4", "CPU per GB"),
    ("TCP download, 1 stream", "tcp-down-1-v4", "CPU per GB"),
    ("serial connections", "conn-serial", "CPU per conn"),
    ("bulk UDP up", "udp-up-3G-v4", "CPU per GB"),
    ("bulk UDP down", "udp-down-3G-v4", "CPU per GB"),
)


def render_targets_16(run: Run) -> list[str]:
    """Issue 16's target: a route through a SOCKS5 proxy (danted on the gateway host) keeps
    at least 0.8 times the direct path's figure, both measured in this run."""

    def value(method: str, workload: str, metric: str) -> float | None:
        for r in run.records:
            if (r["method"], r["workload"], r["metric"], r["mtu"]) == (
                method, workload, metric, 1500
            ):  # fmt: skip
                return None if r["value"] is None else float(r["value"])
        return None

    out = []
    for what, workload, metric in PROXIED_ROWS:
        proxied = value("tunlwip-socks5", workload, metric)
        direct = value("tunlwip", workload, metric)
        if proxied is None or not direct:
            continue
        x = proxied / direct
        out.append(f"| {what} ≥ 0.8{X} direct | {fmt(proxied)} vs {fmt(direct)}: "
                   f"{fmt_ratio(x)} | {'yes' if x >= 0.8 else 'no'} |")  # fmt: skip
    # The gateway's own cost of the proxied path (danted's CPU left out): what tunlwip can
    # change, where the throughput above is also bounded by danted sharing the machine.
    for what, workload, metric in GATEWAY_COST_ROWS:
        proxied = value("tunlwip-socks5", workload, f"{metric}, gateway only")
        direct = value("tunlwip", workload, metric)
        if proxied is None or not direct:
            continue
        x = fmt_ratio(proxied / direct)
        out.append(f"| {what}: gateway CPU through danted ÷ direct (danted's own not counted) | "
                   f"{fmt(proxied)} vs {fmt(direct)}: {x} | — |")  # fmt: skip
    if not out:
        return []
    return ["## Issue 16 target: through danted (SOCKS5) vs direct, MTU 1500", "",
            "| target | this run | met |", "|---|---|---|", *out, ""]  # fmt: skip
