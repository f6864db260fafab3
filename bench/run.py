#!/usr/bin/env python3
"""tunlwip benchmark: the kernel, slirp4netns, pasta, hev-socks5-tunnel + danted and tunlwip
(one worker and two), measured in one run.

Why: a gateway is judged by throughput, connection rate, latency, CPU and memory against what
a user would pick instead, and absolute figures from a shared machine mean little: every
figure is therefore also given as a ratio to the kernel's own forwarding measured minutes
earlier in the same run, and tunlwip's as ratios to its peers (report.COMPARISONS).

Each (MTU, phase, method) gets fresh namespaces ``cli``, ``gw``, ``srv`` (tests/netns.py, per-
process names, 198.18.0.0/15 and fd00::/8 only) that are deleted afterwards, whatever happened
(Ctrl-C and SIGTERM included). Needs root. See bench/README.md.

    make bench                                   # everything (about 30-40 minutes)
    .venv/bin/python bench/run.py --quick --methods tunlwip --workloads iperf3-download
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import methods
from methods import HEV_ENV, METHODS, ROOT, available, netns
from report import Run, fmt, fmt_ratio, render
from workloads import (
    ALIASES,
    NOT_APPLICABLE,
    PHASE_FUNCS,
    PHASES,
    Ctx,
    Options,
    probe,
    start_servers,
)

RESULTS = ROOT / "bench" / "results"


# -- the run ----------------------------------------------------------------------------------


def tool_version(*cmd: str) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (r.stdout or r.stderr).strip().splitlines()
    lines = [t for t in text if t.strip() and "syslog" not in t]
    return lines[0].strip() if lines else "?"


def tunlwip_version() -> str:
    """The installed package's version (for a copy of the tree without git)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunlwip")
    except PackageNotFoundError:
        return "?"


def host_meta(opts: Options, mtus: list[int]) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    rev = "git " + tool_version("git", "-C", str(ROOT), "describe", "--always", "--dirty")
    if not (ROOT / ".git").exists():  # an unpacked copy: git would print its error instead
        rev = f"version {tunlwip_version()}"
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "load average at start": f"{load} (other work on the machine adds noise)",
        "host": f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu})",
        "tunlwip": f"{rev}, {sys.executable}",
        "tools": "; ".join(
            [
                tool_version("iperf3", "--version"),
                tool_version("slirp4netns", "--version"),
                "pasta (passt) " + _dpkg_version("passt"),
                "danted " + _dpkg_version("dante-server"),
                "hev-socks5-tunnel " + (methods.hev_binary()[0] or "not found"),
                "dnsperf " + _dpkg_version("dnsperf"),
                "unbound " + _dpkg_version("unbound"),
            ]
        ),
        "settings": (
            f"MTUs {','.join(map(str, mtus))}; iperf3 {opts.duration} s per run, streams "
            f"{','.join(map(str, opts.streams))}, IPv6 {'on' if opts.ipv6 else 'off'}; "
            f"{opts.conns} connections (serial, {opts.parallel} parallel); "
            f"rr {opts.rr_seconds:g} s, rr-plain {opts.rr_rounds} rounds; "
            f"UDP {opts.udp_rate} and {opts.udp_bulk_rate}; "
            f"DNS concurrency {opts.dns_concurrency}; "
            f"held {opts.tcp_hold} TCP / {opts.udp_hold} UDP"
        ),
    }


def _dpkg_version(pkg: str) -> str:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return r.stdout.strip() if r.returncode == 0 else "not installed"


def run_one(run: Run, method: str, phase: str, mtu: int, opts: Options, work: Path) -> None:
    """One phase of one method at one MTU, in namespaces of its own."""
    wdir = Path(tempfile.mkdtemp(prefix=f"{method}-{phase}-{mtu}-", dir=work))
    t0 = time.monotonic()
    with netns.Topology() as topo:
        split = netns.split_topology(topo)
        start_servers(split, wdir, phase)
        middle = methods.start(method, split, mtu, wdir)
        ctx = Ctx(split, middle, mtu, opts, wdir)
        try:
            probe(ctx)
            PHASE_FUNCS[phase](ctx)
        finally:
            for m in ctx.out:
                rec = run.add(m)
                notes = [f"{fmt_ratio(rec['ratio'])} of kernel"] if rec["ratio"] else []
                notes += [
                    f"{fmt_ratio(v)} of {k[6:]}"
                    for k, v in rec.items()
                    if k.startswith("ratio_") and v
                ]
                if m.error:
                    notes.append(f"ERROR {m.error}")
                print(
                    f"  {method:<12} {m.workload:<18} {m.metric:<16} {fmt(m.value):>10} "
                    f"{m.unit:<9} {', '.join(notes)}".rstrip(),
                    flush=True,
                )
        if not middle.alive():
            raise RuntimeError(f"{method} died during {phase}: {middle.log_tail()}")
    print(f"  ({method} {phase} @ MTU {mtu}: {time.monotonic() - t0:.0f} s)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS)
    )
    p.add_argument(
        "--workloads",
        default="all",
        help="comma list of phases: "
        + ", ".join(PHASES)
        + " (aliases: iperf3, memory, plain, all)",
    )
    p.add_argument("--mtus", default=None, help="comma list (default 1500,65520; --quick 1500)")
    p.add_argument(
        "--every-mtu",
        action="store_true",
        help="run every phase at every MTU (default: only iperf3 at the larger ones)",
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per iperf3/dnsperf run (5)")
    p.add_argument("--conns", type=int, default=None, help="connections per connrate run (2000)")
    p.add_argument("--tcp-hold", type=int, default=None, help="idle TCP connections held (10000)")
    p.add_argument("--udp-hold", type=int, default=None, help="UDP sessions held (5000)")
    p.add_argument("--dns-concurrency", type=int, default=32, help="queries in flight (32)")
    p.add_argument("--no-ipv6", action="store_true", help="IPv4 only")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 s runs, few connections, MTU 1500, IPv4, 1 stream",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="stop starting new phases after this many seconds (3600; --quick 180)",
    )
    p.add_argument(
        "--hev-bin",
        type=Path,
        default=None,
        help=f"hev-socks5-tunnel binary for the hev method (default: ${HEV_ENV}, then PATH; "
        "the method is skipped with a note when there is none)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the per-phase logs and print where"
    )
    return p.parse_args(argv)


def options(a: argparse.Namespace) -> tuple[Options, list[int]]:
    q = a.quick
    opts = Options(
        duration=a.duration or (1 if q else 5),
        streams=(1,) if q else (1, 4),
        ipv6=not (a.no_ipv6 or q),
        conns=a.conns or (200 if q else 2000),
        rr_seconds=float(a.duration or (1 if q else 5)),
        rr_rounds=500 if q else 5000,
        dns_concurrency=a.dns_concurrency,
        dns_names=20_000 if q else 300_000,
        tcp_hold=a.tcp_hold or (500 if q else 10_000),
        udp_hold=a.udp_hold or (200 if q else 5_000),
        step_timeout=30.0 if q else 120.0,
    )
    mtus = [int(x) for x in (a.mtus or ("1500" if q else "1500,65520")).split(",")]
    return opts, mtus


def selected_phases(spec: str) -> list[str]:
    want: list[str] = []
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        for phase in ALIASES.get(name, [name]):
            if phase not in PHASES:
                raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(PHASES)}")
            if phase not in want:
                want.append(phase)
    return [p for p in PHASES if p in want]


def raise_nofile() -> None:
    """10,000 held connections need >10,000 fds in the client, the gateway and the server;
    children inherit this limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(hard, 65536), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return
        except (ValueError, OSError):
            continue


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def preflight(tool: str) -> int:
    """0 when this process may build namespaces (root, netns usable), else 77 (skipped) with
    the reason printed; then files and signals are set up for a long run that must clean up
    its namespaces on Ctrl-C or SIGTERM."""
    if os.geteuid() != 0:
        print(f"{tool}: needs root (network namespaces, TUN, veth)", file=sys.stderr)
        return 77
    ok, why = netns.have_netns()
    if not ok:
        print(f"{tool}: cannot use network namespaces: {why}", file=sys.stderr)
        return 77
    raise_nofile()  # 10,000 held connections: the client, the gateway and the server inherit it
    # Explicitly: a shell starting us in the background would leave SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if (refused := preflight("bench")) != 0:
        return refused
    if a.hev_bin is not None:
        os.environ[HEV_ENV] = str(a.hev_bin.resolve())  # methods.hev_binary() reads it
    chosen = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in chosen:
        if m not in METHODS:
            print(f"bench: unknown method {m!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
    chosen = [m for m in METHODS if m in chosen]  # kernel first: ratios need the baseline
    phases = selected_phases(a.workloads)
    needs = {"iperf3"} if any(p.startswith(("iperf3", "udp")) for p in phases) else set()
    needs |= {"unbound"} if "dns" in phases else set()
    for tool in sorted(needs):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is required (make bench installs it)", file=sys.stderr)
            return 78
    opts, mtus = options(a)
    max_time = a.max_time or (180.0 if a.quick else 3600.0)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Run(
        stamp,
        a.results_dir / f"{stamp}.jsonl",
        a.results_dir / f"{stamp}.md",
        host_meta(opts, mtus),
    )
    work = Path(tempfile.mkdtemp(prefix="tunlwip-bench-"))
    deadline = time.monotonic() + max_time
    interrupted = False
    print(f"bench: methods {','.join(chosen)}; phases {','.join(phases)}; MTUs {mtus}", flush=True)
    try:
        for i, mtu in enumerate(mtus):
            for phase in phases:
                if i > 0 and not PHASES[phase] and not a.every_mtu:
                    continue
                print(f"== {phase} @ MTU {mtu}", flush=True)
                for method in chosen:
                    reason = NOT_APPLICABLE.get((phase, method)) or available(method, mtu)
                    if reason is None and time.monotonic() > deadline:
                        reason = f"run time limit ({max_time:g} s, --max-time) reached"
                    if reason:
                        run.skip(method, phase, mtu, reason)
                        continue
                    try:
                        run_one(run, method, phase, mtu, opts, work)
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:
                        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:600]
                        run.skip(method, phase, mtu, f"failed: {msg}")
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted; namespaces removed, writing partial results", flush=True)
    finally:
        if a.keep_logs:
            print(f"bench: logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = render(run, chosen, interrupted)
    run.md.write_text(text + "\n")
    print()
    print(text)
    print(f"bench: wrote {run.md} and {run.jsonl}")
    measured = any(r["value"] is not None for r in run.records)
    if interrupted:
        return 130
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
