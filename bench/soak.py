#!/usr/bin/env python3
"""Soak: many flows through one ``tunlwip up``, then check that it is back where it started.

Why: a leak of one PCB, socket or flow record per connection is invisible in a benchmark that
runs a few thousand connections against a fresh gateway, and fatal in a gateway that runs for
months. So one gateway gets, in turn (issue 8, item 5):

1. 100,000 short TCP connections *in sequence*: one loadgen ``connrate`` client process with
   one thread, each connection opened, 1 byte each way, closed before the next one starts;
2. 10,000 TCP connections held open at once (loadgen ``hold-tcp``), then closed; twice;
3. 5,000 UDP sessions (loadgen ``hold-udp``: one answered datagram each), then left to the
   gateway's idle timeout (``--udp-idle-timeout``, 5 s here instead of 60); twice.

After each phase the gateway is given a bounded time to drain (lwIP's TIME-WAIT is 10 s; UDP
sessions live at most idle timeout + sweep interval), and a snapshot is taken: the gateway's
TCP connections and UDP sessions and lwIP's TCP PCB count (``tunlwip status --json`` over the
control socket), its open fds (``/proc/PID/fd``) and RSS / peak RSS (VmRSS / VmHWM). The soak
fails (exit 1) if a drained snapshot has more connections, sessions, PCBs or fds than the
baseline, or if RSS grew like a leak rather than like allocator retention (``RssBudget``).

The topology, the gateway and the load generators are the benchmark's (methods.py,
workloads.py, loadgen.py): namespaces ``cli``/``gw``/``srv`` with this process's prefix,
198.18.0.0/15 only, deleted afterwards whatever happens. Needs root.

    make soak
    .venv/bin/python bench/soak.py --quick          # 2,000 / 500 / 300: under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import methods
from methods import SRV_ADDR4, netns
from report import fmt
from run import RESULTS, host_meta, preflight
from workloads import (
    CONNECT_PORT,
    HOLD_PORT,
    UDP_ECHO_PORT,
    Ctx,
    Options,
    holding,
    loadgen,
    probe,
    start_servers,
)

from tunlwip import control

MTU = 1500
MIB = 1024


@dataclass
class Snapshot:
    """The gateway's state at one point of the soak."""

    label: str
    at: float  # seconds since the gateway started serving
    tcp_connections: int  # the stack's registry: relayed + stream connections
    active_flows: int  # flows the gateway is handling (TCP and UDP handlers)
    pending_dials: int
    udp_sessions: int
    lwip_tcp_pcbs: int  # active + TIME-WAIT PCBs (listeners are kept for life, not counted)
    fds: int
    rss_kib: int
    hwm_kib: int  # peak RSS so far

    def counts(self) -> dict[str, int]:
        """What must come back to the baseline once the gateway drained."""
        return {
            "TCP connections": self.tcp_connections,
            "active flows": self.active_flows,
            "pending dials": self.pending_dials,
            "UDP sessions": self.udp_sessions,
            "lwIP TCP PCBs": self.lwip_tcp_pcbs,
            "fds": self.fds,
        }


@dataclass
class RssBudget:
    """How much RSS may stay behind, in KiB, and why a leak still shows.

    A drained gateway keeps memory it no longer uses: glibc keeps freed chunks (lwIP's PCBs
    and the relay's state are malloc'ed) in its arenas and only returns the top of the heap,
    pymalloc keeps an arena while one object in it lives, and dicts keep their grown tables.
    So RSS after 10,000 connections closed stays near the peak — and is reused by the next
    10,000. Retention is bounded by the peak; a leak grows with every connection. Hence:

    - ``sequential``: after the sequential phase (a few hundred connections at once at most:
      lwIP keeps at most 256 in TIME-WAIT), growth of at most 8 MiB, 84 bytes per connection
      over 100,000: less than any leaked PCB (~200 B), relay state (~400 B) or flow record;
    - ``repeat``: each held phase runs twice (``--rounds``); the second round's RSS may exceed
      the first's by at most 25 % of what the first round added (+ ``slack``): a leak of the
      per-connection state would add ~100 % again, reuse adds ~0;
    - ``final``: after everything drained, RSS at most the highest RSS seen + ``slack``
      (retention never exceeds the peak); the growth over the baseline is reported.
    """

    sequential: int = 8 * MIB
    repeat_share: float = 0.25
    slack: int = 2 * MIB


class Soak:
    """One gateway, the phases in turn, the snapshots, the checks."""

    def __init__(self, ctx: Ctx, control_path: Path, a: argparse.Namespace) -> None:
        self.ctx = ctx
        assert ctx.middle.pid is not None
        self.pid: int = ctx.middle.pid
        self.control_path = control_path
        self.a = a
        self.snapshots: list[Snapshot] = []
        self.figures: dict[str, Any] = {}
        self.failures: list[str] = []
        self.t0 = time.monotonic()

    # -- observation ------------------------------------------------------------------------

    def observe(self, label: str) -> Snapshot:
        """Status over the control socket first, then /proc: the control connection the
        gateway accepted is closed by the time its answer has been read."""
        doc = json.loads(control.request(self.control_path, {"cmd": "status"}, timeout=30))
        totals = doc["totals"]
        stack = totals["stack"]
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        status = Path(f"/proc/{self.pid}/status").read_text()
        mem = {
            k: int(v.split()[0])
            for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)
            if k in ("VmRSS", "VmHWM")
        }
        return Snapshot(
            label,
            round(time.monotonic() - self.t0, 1),
            stack["tcp_connections"],
            totals["active_flows"],
            totals["pending_dials"],
            totals["udp_sessions"],
            stack["lwip_tcp_pcbs"],
            fds,
            mem["VmRSS"],
            mem["VmHWM"],
        )

    def record(self, s: Snapshot) -> Snapshot:
        self.snapshots.append(s)
        print(
            f"  {s.label:<40} tcp {s.tcp_connections:>6} udp {s.udp_sessions:>6} "
            f"pcbs {s.lwip_tcp_pcbs:>6} fds {s.fds:>6} rss {s.rss_kib / MIB:6.1f} MiB "
            f"(peak {s.hwm_kib / MIB:.1f})",
            flush=True,
        )
        return s

    def drained(self, label: str, target: dict[str, int]) -> Snapshot:
        """Poll (every 0.5 s, at most --drain-timeout s) until no count is above the target's,
        then record the snapshot; a count still above it is a failure."""
        deadline = time.monotonic() + self.a.drain_timeout
        while True:
            s = self.observe(label)
            over = {k: v for k, v in s.counts().items() if v > target[k]}
            if not over or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        for what, value in over.items():
            self.failures.append(
                f"{label}: {what} {value}, baseline {target[what]} "
                f"(still above after {self.a.drain_timeout:g} s)"
            )
        return self.record(s)

    # -- phases -----------------------------------------------------------------------------

    def baseline(self) -> Snapshot:
        """After the probe's connection has drained: an idle gateway that has served one
        connection (lazily created state, such as the catch-all listener, exists)."""
        idle = {k: 0 for k in Snapshot("", 0, 0, 0, 0, 0, 0, 0, 0, 0).counts()}
        idle["fds"] = sys.maxsize  # whatever an idle gateway has open
        return self.drained("baseline (idle, after the probe)", idle)

    def sequential(self, base: Snapshot) -> None:
        n = self.a.sequential
        limit = self.a.phase_time
        print(f"== {n:,} sequential TCP connections (one at a time)", flush=True)
        res = loadgen(
            self.ctx.split.cli,
            "connrate",
            SRV_ADDR4,
            str(CONNECT_PORT),
            "--count",
            str(n),
            "--parallel",
            "1",
            "--max-time",
            str(limit),
            "--timeout",
            "5",
            timeout=limit + 60,
        )
        self.figures["sequential"] = {
            "count": n,
            "ok": res["ok"],
            "failed": res["errors"],
            "first_errors": res["first_errors"],
            "seconds": round(res["elapsed"], 1),
            "rate": round(res["rate"], 1),
            "connect_p50_ms": res["p50_ms"],
            "connect_p99_ms": res["p99_ms"],
        }
        print(
            f"  {res['ok']:,} ok, {res['errors']} failed in {res['elapsed']:.1f} s: "
            f"{res['rate']:,.0f} conn/s",
            flush=True,
        )
        if res["ok"] + res["errors"] < n:
            self.failures.append(f"sequential: only {res['ok'] + res['errors']:,} of {n:,} run")
        self.record(self.observe(f"after {n:,} sequential"))
        after = self.drained(f"{n:,} sequential, drained", base.counts())
        grew = after.rss_kib - base.rss_kib
        if grew > self.a.rss_budget.sequential:
            self.failures.append(
                f"sequential: RSS grew {grew / MIB:.1f} MiB over {n:,} connections "
                f"(budget {self.a.rss_budget.sequential / MIB:.0f} MiB)"
            )

    def hold(self, kind: str, base: Snapshot) -> None:
        """``--rounds`` rounds of: open them all, snapshot, release, drain, snapshot."""
        if kind == "tcp":
            n, port, what = self.a.held, HOLD_PORT, "TCP connections held at once"
        else:
            n, port, what = self.a.udp, UDP_ECHO_PORT, "UDP sessions"
        limit = self.a.phase_time
        args = [f"hold-{kind}", SRV_ADDR4, str(port), "--count", str(n)]
        args += ["--max-time", str(limit), "--max-hold", str(limit + 120)]
        rss: list[tuple[int, int]] = []  # (before, holding) per round
        for r in range(1, self.a.rounds + 1):
            tag = f" (round {r})" if self.a.rounds > 1 else ""
            print(f"== {n:,} {what}{tag}", flush=True)
            before = self.snapshots[-1].rss_kib
            with holding(self.ctx.split.cli, args, limit + 30) as res:
                self.figures[f"held_{kind}_{r}"] = {
                    "count": n,
                    "held": res["held"],
                    "failed": res["failed"],
                    "unfinished": res["unfinished"],
                    "seconds": round(res["elapsed"], 1),
                }
                print(f"  {res['held']:,} held, {res['failed']} failed in {res['elapsed']:.1f} s")
                if res["held"] < n:
                    self.failures.append(f"{kind}{tag}: only {res['held']:,} of {n:,} held")
                time.sleep(1)  # let the gateway finish allocating for the last ones
                held = self.record(self.observe(f"{res['held']:,} {what}{tag}"))
            rss.append((before, held.rss_kib))
            # The client closed its sockets: TCP flows end at once, UDP sessions time out.
            label = "released" if kind == "tcp" else "released, idle timeout passed"
            self.drained(f"{what.split(' held')[0]}: {label}{tag}", base.counts())
        budget = self.a.rss_budget
        first_growth = max(0, rss[0][1] - rss[0][0])
        for r, (_before, holding_kib) in enumerate(rss[1:], start=2):
            more = holding_kib - rss[0][1]
            allowed = int(budget.repeat_share * first_growth) + budget.slack
            self.figures[f"held_{kind}_{r}"]["rss_over_round_1_kib"] = more
            if more > allowed:
                self.failures.append(
                    f"{kind} round {r}: RSS {more / MIB:+.1f} MiB over round 1 while holding "
                    f"(allowed {allowed / MIB:.1f} MiB: {budget.repeat_share:.0%} of round 1's "
                    f"{first_growth / MIB:.1f} MiB + {budget.slack / MIB:.0f} MiB)"
                )

    # -- the report -------------------------------------------------------------------------

    def check_final_rss(self, base: Snapshot) -> None:
        final = self.snapshots[-1]
        highest = max(s.rss_kib for s in self.snapshots)
        allowed = highest - base.rss_kib + self.a.rss_budget.slack
        grew = final.rss_kib - base.rss_kib
        self.figures["rss"] = {
            "baseline_kib": base.rss_kib,
            "final_kib": final.rss_kib,
            "growth_kib": grew,
            "budget_kib": allowed,
            "peak_rss_kib": final.hwm_kib,
        }
        if grew > allowed:
            self.failures.append(
                f"final: RSS grew {grew / MIB:.1f} MiB, more than at the peak "
                f"(budget {allowed / MIB:.1f} MiB)"
            )

    def render(self, stamp: str, meta: dict[str, Any]) -> str:
        out = [f"# tunlwip soak {stamp}", ""]
        out += [f"- {k}: {v}" for k, v in meta.items()]
        out += ["", "## Snapshots", ""]
        head = [
            "snapshot",
            "s",
            "TCP conns",
            "active flows",
            "UDP sessions",
            "lwIP TCP PCBs",
            "fds",
            "RSS MiB",
            "peak RSS MiB",
        ]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.snapshots:
            cells = [
                s.label,
                f"{s.at:.0f}",
                fmt(s.tcp_connections),
                fmt(s.active_flows),
                fmt(s.udp_sessions),
                fmt(s.lwip_tcp_pcbs),
                fmt(s.fds),
                f"{s.rss_kib / MIB:.1f}",
                f"{s.hwm_kib / MIB:.1f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out += ["", "## Figures", ""]
        seq = self.figures.get("sequential")
        if seq:
            out.append(
                f"- sequential: {seq['ok']:,} connections ok, {seq['failed']} failed, "
                f"{seq['seconds']} s: **{fmt(seq['rate'])} conn/s** (connect p50 "
                f"{fmt(seq['connect_p50_ms'])} ms, p99 {fmt(seq['connect_p99_ms'])} ms)"
            )
        for key, h in self.figures.items():
            if not key.startswith("held_"):
                continue
            kind, r = key.split("_")[1:]
            what = "TCP connections held at once" if kind == "tcp" else "UDP sessions"
            more = h.get("rss_over_round_1_kib")
            extra = "" if more is None else f"; RSS {more / MIB:+.1f} MiB over round 1"
            out.append(
                f"- {what}, round {r}: {h['held']:,} of {h['count']:,} ({h['failed']} failed), "
                f"opened in {h['seconds']} s{extra}"
            )
        rss = self.figures.get("rss")
        if rss:
            out.append(
                f"- RSS: baseline {rss['baseline_kib'] / MIB:.1f} MiB, final "
                f"{rss['final_kib'] / MIB:.1f} MiB ({rss['growth_kib'] / MIB:+.1f} MiB; budget "
                f"{rss['budget_kib'] / MIB:.1f} MiB), **peak {rss['peak_rss_kib'] / MIB:.1f} "
                "MiB**"
            )
        base, last = self.snapshots[0], self.snapshots[-1]
        out.append(f"- fds: {base.fds} before, {last.fds} after")
        out += ["", "## Verdict", ""]
        if self.failures:
            out += ["**FAILED**", ""] + [f"- {f}" for f in self.failures]
        else:
            out.append(
                "**OK**: connections, sessions, PCBs and fds back to the baseline; "
                "RSS within budget."
            )
        return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sequential", type=int, default=None, help="short TCP connections (100000)")
    p.add_argument("--held", type=int, default=None, help="TCP connections held at once (10000)")
    p.add_argument("--udp", type=int, default=None, help="UDP sessions (5000)")
    p.add_argument("--udp-idle-timeout", type=float, default=5.0, help="gateway's, seconds (5)")
    p.add_argument(
        "--phase-time", type=float, default=900.0, help="seconds each phase may take (900)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the gateway to come back to the baseline (60)",
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="rounds of each held phase (2; see RssBudget)"
    )
    p.add_argument("--quick", action="store_true", help="2,000 / 500 / 300: about a minute")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    a.sequential = a.sequential or (2_000 if a.quick else 100_000)
    a.held = a.held or (500 if a.quick else 10_000)
    a.udp = a.udp or (300 if a.quick else 5_000)
    a.rss_budget = RssBudget()
    return a


def widen_ports(split: methods.SplitTopology) -> None:
    """100,000 connections from one client address to one server port: the whole port range
    in cli (the client) and gw (which dials srv). The client closes first and its kernel keeps
    each closed connection 60 s in TIME-WAIT, which at more than ~1,000 connections/s would
    still use up the range: cli's kernel keeps at most 32,768 (the rest close at once; the
    gateway does not see the difference). Namespace sysctls only."""
    for ns in (split.cli, split.gw):
        ns.write_sysctl("net.ipv4.ip_local_port_range", "1024 65535")
    split.cli.write_sysctl("net.ipv4.tcp_max_tw_buckets", "32768")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if (refused := preflight("soak")) != 0:
        return refused
    a.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    jsonl = a.results_dir / f"soak-{stamp}.jsonl"
    md = a.results_dir / f"soak-{stamp}.md"
    opts = Options(ipv6=False)
    meta = host_meta(opts, [MTU])
    del meta["settings"]  # the benchmark's; the soak's are these:
    meta["soak"] = (
        f"{a.sequential:,} sequential TCP connections (1 process, 1 thread, 1 byte each way), "
        f"{a.held:,} held at once and {a.udp:,} UDP sessions, {a.rounds} rounds each; "
        f"IPv4, MTU {MTU}; gateway: the benchmark's `tunlwip up` plus "
        f"--udp-idle-timeout {a.udp_idle_timeout:g}"
    )
    work = Path(tempfile.mkdtemp(prefix="tunlwip-soak-"))
    control_path = work / "control.sock"
    extra = ["--udp-idle-timeout", str(a.udp_idle_timeout), "--control-socket", str(control_path)]
    soak: Soak | None = None
    interrupted = False
    print(f"soak: {meta['soak']}", flush=True)
    try:
        with netns.Topology() as topo:
            split = netns.split_topology(topo)
            widen_ports(split)
            start_servers(split, work, "connrate", "memory-tcp", "memory-udp")
            middle = methods.start("tunlwip", split, MTU, work, tunlwip_args=extra)
            ctx = Ctx(split, middle, MTU, opts, work)
            probe(ctx)
            soak = Soak(ctx, control_path, a)
            base = soak.baseline()
            soak.sequential(base)
            soak.hold("tcp", base)
            soak.hold("udp", base)
            soak.check_final_rss(base)
            if not middle.alive():
                soak.failures.append(f"the gateway died: {middle.log_tail()}")
    except KeyboardInterrupt:
        interrupted = True
        print("soak: interrupted; namespaces removed", flush=True)
    except Exception as exc:
        if soak is None:
            print(f"soak: could not start: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        soak.failures.append(f"aborted: {type(exc).__name__}: {exc}")
    if soak is None:
        print(f"soak: logs in {work}", file=sys.stderr)
        return 130 if interrupted else 1
    if interrupted:
        soak.failures.append("interrupted")
    text = soak.render(stamp, meta)
    with jsonl.open("w") as f:
        for s in soak.snapshots:
            f.write(json.dumps({"run": stamp, "workload": "soak", "snapshot": asdict(s)}) + "\n")
        for name, fig in soak.figures.items():
            f.write(json.dumps({"run": stamp, "workload": "soak", "figure": name, **fig}) + "\n")
        f.write(json.dumps({"run": stamp, "workload": "soak", "failures": soak.failures}) + "\n")
    md.write_text(text)
    print()
    print(text)
    print(f"soak: wrote {md} and {jsonl}")
    if soak.failures:
        print(f"soak: the gateway's and servers' logs are in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if soak.failures else 0


if __name__ == "__main__":
    sys.exit(main())
