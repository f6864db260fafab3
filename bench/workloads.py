"""The workloads: each phase runs on a freshly built method and yields Measurements.

Why fresh per phase: a gateway's state after one workload (TIME-WAIT PCBs, a grown Python heap,
cached DNS answers) must not colour the next, and a method that breaks in one phase still gets
measured in the others. Clients run in ``cli``, servers in ``srv``; every subprocess has a
timeout and every client loop a count and a deadline.

Over 600 lines on purpose: one short phase function per workload next to the table that
names them (PHASES, PHASE_FUNCS) and the helpers they share; they have no other dependency on
each other.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods import SRV_ADDR4, SRV_ADDR6, Middle, Namespace, SplitTopology
from procstat import pss_by_root, tree_cpu_seconds, tree_pss_kib, tree_rss_kib

LOADGEN = str(Path(__file__).resolve().with_name("loadgen.py"))
IPERF_PORT = 5201
CONNECT_PORT, ECHO_PORT, UDP_ECHO_PORT, HOLD_PORT = 7001, 7002, 7003, 7004

#: Phases in run order; "mtu" ones run at every MTU, the rest at the first one only (their
#: payloads are a byte or a DNS message: the MTU does not enter into them).
PHASES = {
    "iperf3-download": True,
    "iperf3-upload": True,
    "udp": False,
    "udp-bulk": False,
    "connrate": False,
    "rr": False,
    "rr-plain": False,
    "connrate-plain": False,
    "dns": False,
    "memory-tcp": False,
    "memory-udp": False,
}
ALIASES = {
    "iperf3": ["iperf3-download", "iperf3-upload"],
    "memory": ["memory-tcp", "memory-udp"],
    "plain": ["rr-plain", "connrate-plain"],
    "all": list(PHASES),
}


@dataclass
class Options:
    duration: int = 5
    streams: tuple[int, ...] = (1, 4)
    ipv6: bool = True
    conns: int = 2000
    parallel: int = 8
    rr_seconds: float = 5.0
    rr_rounds: int = 5000
    udp_rate: str = "200M"
    udp_bulk_rate: str = "3G"
    dns_concurrency: int = 32
    dns_names: int = 300_000
    tcp_hold: int = 10_000
    udp_hold: int = 5_000
    step_timeout: float = 120.0


@dataclass
class Measurement:
    """One figure. ``value`` None means it could not be measured (``error`` says why)."""

    method: str
    workload: str
    metric: str
    mtu: int
    value: float | None
    unit: str
    better: str  # "higher" or "lower"
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Ctx:
    split: SplitTopology
    middle: Middle
    mtu: int
    opts: Options
    work: Path
    out: list[Measurement] = field(default_factory=list)

    def add(
        self,
        workload: str,
        metric: str,
        value: float | None,
        unit: str,
        better: str = "higher",
        error: str = "",
        **extra: Any,
    ) -> None:
        self.out.append(
            Measurement(
                self.middle.method, workload, metric, self.mtu, value, unit, better, extra, error
            )
        )


# -- process accounting -----------------------------------------------------------------------


@contextmanager
def cpu_meter(ctx: Ctx, workload: str) -> Iterator[None]:
    """Record the gateway's CPU seconds spent during the block: every process of it and their
    children (procstat.tree_cpu_seconds); no record for the kernel. A gateway with helper
    processes (a SOCKS5 proxy) also gets "cpu, helpers": their share of it, so the CPU per
    operation can be shown without the proxy's (``gateway only``)."""
    roots, helpers = ctx.middle.roots, ctx.middle.helpers
    before = tree_cpu_seconds(roots) if roots else 0.0
    before_helpers = tree_cpu_seconds(helpers) if helpers else 0.0
    try:
        yield
    finally:
        if roots and ctx.middle.alive():
            ctx.add(workload, "cpu", tree_cpu_seconds(roots) - before, "s", "lower")
            if helpers:
                spent = tree_cpu_seconds(helpers) - before_helpers
                ctx.add(workload, "cpu, helpers", spent, "s", "lower")


# -- helpers ----------------------------------------------------------------------------------


def loadgen(ns: Namespace, *args: str, timeout: float) -> dict[str, Any]:
    """Run a loadgen client in ``ns``; its last stdout line is the JSON result."""
    r = ns.run(sys.executable, LOADGEN, *args, check=False, timeout=timeout)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError(f"loadgen {args[0]} gave no result (exit {r.returncode}): {r.stderr[-500:]}")


def start_server(ns: Namespace, work: Path, *args: str) -> subprocess.Popen[bytes]:
    """A background server in ``ns`` (stopped with the topology), logging to ``work``."""
    log = work / ("srv-" + "-".join(a.replace("/", "_") for a in args[-2:]) + ".log")
    with log.open("wb") as f:
        return ns.popen(list(args), stdout=f, stderr=subprocess.STDOUT)


def start_servers(split: SplitTopology, work: Path, *phases: str) -> None:
    """What the ``phases`` need in srv, plus the echo server every phase probes the path with
    (several phases: the soak runs its workloads against one gateway)."""
    srv = split.srv
    start_server(srv, work, sys.executable, LOADGEN, "serve", "echo", str(ECHO_PORT))
    waits: list[tuple[int, str]] = [(ECHO_PORT, "tcp")]
    if any(p.startswith(("iperf3", "udp")) for p in phases):
        start_server(srv, work, "iperf3", "-s", "-p", str(IPERF_PORT))
        waits.append((IPERF_PORT, "tcp"))
    if "connrate" in phases:  # the plain phases use the echo server above
        start_server(srv, work, sys.executable, LOADGEN, "serve", "connect", str(CONNECT_PORT))
        waits.append((CONNECT_PORT, "tcp"))
    if "memory-tcp" in phases:
        start_server(srv, work, sys.executable, LOADGEN, "serve", "hold", str(HOLD_PORT))
        waits.append((HOLD_PORT, "tcp"))
    if "memory-udp" in phases:
        start_server(srv, work, sys.executable, LOADGEN, "serve", "udp-echo", str(UDP_ECHO_PORT))
        waits.append((UDP_ECHO_PORT, "udp"))
    if "dns" in phases:
        start_unbound(srv, work)
        waits += [(53, "udp"), (53, "tcp")]
    for port, proto in waits:
        srv.wait_port(port, proto=proto, timeout=15)


def unbound_conf(work: Path) -> str:
    """Every name under bench.test answers (a redirect zone), so "uncached" can use as many
    distinct names as it likes; unbound answers them from memory, never from a network."""
    lines = [
        f"interface: {SRV_ADDR4}",
        f"interface: {SRV_ADDR6}",
        "port: 53",
        "do-daemonize: no",
        'username: ""',
        'chroot: ""',
        f'directory: "{work}"',
        'pidfile: ""',
        "use-syslog: no",
        "verbosity: 0",
        "num-threads: 1",
        "access-control: 0.0.0.0/0 allow",
        "access-control: ::/0 allow",
        'module-config: "iterator"',
        'local-zone: "bench.test." redirect',
        'local-data: "bench.test. 3600 IN A 198.18.9.9"',
        'local-data: "bench.test. 3600 IN AAAA fd00:9::9"',
    ]
    body = "".join(f"    {line}\n" for line in lines)
    return f"server:\n{body}remote-control:\n    control-enable: no\n"


def start_unbound(srv: Namespace, work: Path) -> None:
    conf = work / "unbound.conf"
    conf.write_text(unbound_conf(work))
    start_server(srv, work, "unbound", "-d", "-c", str(conf))


def probe(ctx: Ctx) -> None:
    """Fail fast (with the method's log) if cli cannot reach srv through the method."""
    hosts = [SRV_ADDR4] + ([SRV_ADDR6] if ctx.opts.ipv6 else [])
    for host in hosts:
        res = loadgen(ctx.split.cli, "probe", host, str(ECHO_PORT), "--max-time", "15", timeout=30)
        if not res.get("ok"):
            raise RuntimeError(
                f"cli cannot reach {host}:{ECHO_PORT}: {res.get('error')}; {ctx.middle.log_tail()}"
            )


def families(ctx: Ctx) -> list[tuple[str, str]]:
    return [("v4", SRV_ADDR4)] + ([("v6", SRV_ADDR6)] if ctx.opts.ipv6 else [])


def iperf3(ctx: Ctx, host: str, *extra: str) -> dict[str, Any]:
    """One iperf3 client run (JSON). A "server busy" answer (the previous test's server side is
    still closing) is retried twice after a second."""
    d = ctx.opts.duration
    args = [
        "iperf3",
        "-c",
        host,
        "-p",
        str(IPERF_PORT),
        "-t",
        str(d),
        "-J",
        "--connect-timeout",
        "5000",
        *extra,
    ]
    data: dict[str, Any] = {}
    for attempt in range(3):
        try:
            r = ctx.split.cli.run(*args, check=False, timeout=d + 30)
        except subprocess.TimeoutExpired:
            return {"error": f"iperf3 did not finish within {d + 30}s"}
        try:
            data = json.loads(r.stdout)
        except json.JSONDecodeError:
            data = {"error": (r.stderr or r.stdout)[-300:].strip() or f"exit {r.returncode}"}
        if "busy" in str(data.get("error", "")) and attempt < 2:
            time.sleep(1)
            continue
        break
    return data


# -- phases -----------------------------------------------------------------------------------


def phase_iperf3(ctx: Ctx, direction: str) -> None:
    """TCP bulk transfer: ``down`` = srv sends to cli (iperf3 -R), ``up`` = cli sends."""
    for fam, host in families(ctx):
        for streams in ctx.opts.streams:
            workload = f"tcp-{direction}-{streams}-{fam}"
            extra = (["-R"] if direction == "down" else []) + (
                ["-P", str(streams)] if streams > 1 else []
            )
            with cpu_meter(ctx, workload):
                data = iperf3(ctx, host, *extra)
            if "error" in data:
                ctx.add(workload, "throughput", None, "Mbit/s", error=str(data["error"]))
                continue
            end = data["end"]
            ctx.add(
                workload,
                "throughput",
                end["sum_received"]["bits_per_second"] / 1e6,
                "Mbit/s",
                retransmits=end.get("sum_sent", {}).get("retransmits"),
            )
            add_cpu_per_gb(ctx, workload, end["sum_received"]["bytes"])


def phase_udp(ctx: Ctx, rate: str) -> None:
    """UDP at a fixed offered rate (iperf3 -u -b RATE -l 1400), both directions: what arrives,
    how much is lost, and the gateway CPU per GB that arrived. ``udp`` offers 200 Mbit/s
    (below every method's limit: loss and CPU are the figures), ``udp-bulk`` 3 Gbit/s (above
    every userspace method's limit: what arrives is the figure)."""
    for direction, extra in (("up", []), ("down", ["-R"])):
        workload = f"udp-{direction}-{rate}-v4"
        with cpu_meter(ctx, workload):
            data = iperf3(ctx, SRV_ADDR4, "-u", "-b", rate, "-l", "1400", *extra)
        if "error" in data:
            ctx.add(workload, "received", None, "Mbit/s", error=str(data["error"]))
            continue
        recv = data["end"]["sum_received"]
        ctx.add(workload, "received", recv["bits_per_second"] / 1e6, "Mbit/s")
        ctx.add(workload, "loss", recv["lost_percent"], "%", "lower")
        add_cpu_per_gb(ctx, workload, recv["bytes"])


def phase_connrate(ctx: Ctx) -> None:
    """N short connections (connect / 1 byte each way / close), serial and in parallel."""
    o = ctx.opts
    for parallel in (1, o.parallel):
        workload = "conn-serial" if parallel == 1 else f"conn-par{parallel}"
        with cpu_meter(ctx, workload):
            try:
                res = loadgen(
                    ctx.split.cli,
                    "connrate",
                    SRV_ADDR4,
                    str(CONNECT_PORT),
                    "--count",
                    str(o.conns),
                    "--parallel",
                    str(parallel),
                    "--max-time",
                    str(o.step_timeout),
                    "--timeout",
                    "5",
                    timeout=o.step_timeout + 30,
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                ctx.add(workload, "rate", None, "conn/s", error=str(exc))
                continue
        add_rate(ctx, workload, res)
        ctx.add(workload, "connect p50", res["p50_ms"], "ms", "lower")
        ctx.add(workload, "connect p99", res["p99_ms"], "ms", "lower")
        ctx.add(workload, "failed", res["errors"], "conns", "lower")
        add_cpu_per(ctx, workload, "conn", res["ok"])


def phase_rr(ctx: Ctx) -> None:
    """Request/response on one connection: 1-byte ping-pong, TCP_NODELAY."""
    workload = "rr-1byte"
    with cpu_meter(ctx, workload):
        try:
            res = loadgen(
                ctx.split.cli,
                "rr",
                SRV_ADDR4,
                str(ECHO_PORT),
                "--seconds",
                str(ctx.opts.rr_seconds),
                timeout=ctx.opts.rr_seconds + 30,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            ctx.add(workload, "rate", None, "trans/s", error=str(exc))
            return
    ctx.add(workload, "rate", res["rate"], "trans/s", error=res["error"])
    ctx.add(workload, "p50", res["p50_us"], "µs", "lower")
    ctx.add(workload, "p99", res["p99_us"], "µs", "lower")
    add_cpu_per(ctx, workload, "round", res["transactions"])


def add_rate(ctx: Ctx, workload: str, res: dict[str, Any]) -> None:
    """Record a connection-rate result of loadgen (rate, with its failures as the error)."""
    err = "; ".join(res["first_errors"]) if res["errors"] else ""
    ctx.add(workload, "rate", res["rate"], "conn/s", error="" if res["ok"] else err,
            ok=res["ok"], errors=res["errors"], first_errors=res["first_errors"])  # fmt: skip


def _last_cpu(ctx: Ctx, workload: str, metric: str = "cpu") -> float | None:
    """The cpu figure cpu_meter just recorded for ``workload`` (None for the kernel)."""
    return next(
        (m.value for m in reversed(ctx.out) if m.metric == metric and m.workload == workload),
        None,
    )


def _gateway_only(ctx: Ctx, workload: str, cpu: float) -> float | None:
    """``cpu`` without its helpers' share (hev's or tunlwip-socks5's danted), if it had any."""
    helpers = _last_cpu(ctx, workload, "cpu, helpers")
    return None if helpers is None else max(0.0, cpu - helpers)


def add_cpu_per(ctx: Ctx, workload: str, unit: str, count: int) -> None:
    """Gateway CPU per operation from the cpu figure cpu_meter just recorded: comparable
    across methods and runs when the rates are not (the rate of a ping-pong on two shared
    CPUs depends on where the scheduler puts its three processes). Counted in clock ticks
    (10 ms): read a figure from a 200-operation --quick run as an order of magnitude."""
    cpu = _last_cpu(ctx, workload)
    if cpu is not None and count:
        ctx.add(workload, f"CPU per {unit}", cpu / count * 1e6, "µs", "lower", ticks_s=cpu)
        own = _gateway_only(ctx, workload, cpu)
        if own is not None:
            ctx.add(workload, f"CPU per {unit}, gateway only", own / count * 1e6, "µs", "lower",
                    ticks_s=own)  # fmt: skip


def add_cpu_per_gb(ctx: Ctx, workload: str, nbytes: int) -> None:
    """Gateway CPU seconds per GB (10^9 bytes) that reached the receiver, for bulk phases."""
    cpu = _last_cpu(ctx, workload)
    if cpu is not None and nbytes:
        ctx.add(workload, "CPU per GB", cpu / (nbytes / 1e9), "s", "lower", ticks_s=cpu)
        own = _gateway_only(ctx, workload, cpu)
        if own is not None:
            ctx.add(workload, "CPU per GB, gateway only", own / (nbytes / 1e9), "s", "lower",
                    ticks_s=own)  # fmt: skip


def phase_rr_plain(ctx: Ctx) -> None:
    """Request/response as a plain blocking client sees it: one process, one thread,
    ``create_connection`` with no socket options and no timeout, N rounds of 1 byte each way
    (the harness of issue 17). ``rr`` measures the same path with TCP_NODELAY, a socket
    timeout (poll before each recv) and a deadline instead of a count."""
    workload = "rr-plain"
    with cpu_meter(ctx, workload):
        try:
            res = loadgen(
                ctx.split.cli,
                "rr-plain",
                SRV_ADDR4,
                str(ECHO_PORT),
                "--count",
                str(ctx.opts.rr_rounds),
                timeout=ctx.opts.step_timeout,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            ctx.add(workload, "rate", None, "trans/s", error=str(exc))
            return
    ctx.add(workload, "rate", res["rate"], "trans/s", error=res["error"])
    ctx.add(workload, "p50", res["p50_us"], "µs", "lower")
    ctx.add(workload, "p99", res["p99_us"], "µs", "lower")
    add_cpu_per(ctx, workload, "round", res["transactions"])


def phase_connrate_plain(ctx: Ctx) -> None:
    """Short connections as a plain blocking client makes them: N serial times
    ``create_connection``, 1 byte each way with the echo server, close (the client closes
    first), each timed whole. ``connrate`` times the connect() alone, against a server that
    closes first."""
    o = ctx.opts
    workload = "conn-plain"
    with cpu_meter(ctx, workload):
        try:
            res = loadgen(
                ctx.split.cli,
                "connrate-plain",
                SRV_ADDR4,
                str(ECHO_PORT),
                "--count",
                str(o.conns),
                "--max-time",
                str(o.step_timeout),
                timeout=o.step_timeout + 30,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            ctx.add(workload, "rate", None, "conn/s", error=str(exc))
            return
    add_rate(ctx, workload, res)
    ctx.add(workload, "p50", res["p50_us"], "µs", "lower")
    ctx.add(workload, "p99", res["p99_us"], "µs", "lower")
    ctx.add(workload, "failed", res["errors"], "conns", "lower")
    add_cpu_per(ctx, workload, "conn", res["ok"])


def dns_files(work: Path, count: int) -> dict[str, Path]:
    """dnsperf input: one name repeated (cached) and ``count`` distinct names (uncached)."""
    cached = work / "dns-cached.txt"
    cached.write_text("cached.bench.test A\n")
    uncached = work / "dns-uncached.txt"
    with uncached.open("w") as f:
        f.writelines(f"u{i}.bench.test A\n" for i in range(count))
    return {"cached": cached, "uncached": uncached}


def dnsperf(ctx: Ctx, server: str, names: Path, once: bool) -> dict[str, Any]:
    """dnsperf -v: its summary for qps, and every query's latency line for p50/p99."""
    o = ctx.opts
    args = [
        "dnsperf",
        "-s",
        server,
        "-d",
        str(names),
        "-l",
        str(o.duration),
        "-q",
        str(o.dns_concurrency),
        "-t",
        "2",
        "-v",
    ] + (["-n", "1"] if once else [])
    r = ctx.split.cli.run(*args, check=False, timeout=o.duration + 30)
    lat: list[float] = []
    qps = None
    lost = completed = 0
    for line in r.stdout.splitlines():
        if line.startswith("> "):
            parts = line.split()
            if parts[1] == "T":
                continue
            try:
                lat.append(float(parts[-1]) * 1000)
            except ValueError:
                continue  # a line torn by dnsperf's threads
        elif "Queries per second:" in line:
            qps = float(line.split(":")[1])
        elif "Queries lost:" in line:
            lost = int(line.split(":")[1].split()[0])
        elif "Queries completed:" in line:
            completed = int(line.split(":")[1].split()[0])
    if qps is None:
        raise RuntimeError(f"dnsperf failed (exit {r.returncode}): {(r.stderr or r.stdout)[-300:]}")
    p50, p99 = _pct(lat, 50), _pct(lat, 99)
    return {"qps": qps, "p50_ms": p50, "p99_ms": p99, "lost": lost, "completed": completed}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def phase_dns(ctx: Ctx) -> None:
    """Queries per second at a fixed concurrency: tunlwip's proxy (to its own address) with
    unbound in srv as upstream; for the kernel, unbound itself through plain forwarding."""
    files = dns_files(ctx.work, ctx.opts.dns_names)
    have_dnsperf = shutil.which("dnsperf") is not None
    for kind, path in files.items():
        workload = f"dns-{kind}"
        with cpu_meter(ctx, workload):
            try:
                if have_dnsperf:
                    res = dnsperf(ctx, ctx.middle.dns_server, path, once=kind == "uncached")
                else:
                    res = loadgen(
                        ctx.split.cli,
                        "dns",
                        ctx.middle.dns_server,
                        "--names-file",
                        str(path),
                        "--seconds",
                        str(ctx.opts.duration),
                        "--concurrency",
                        str(ctx.opts.dns_concurrency),
                        timeout=ctx.opts.duration + 30,
                    )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                ctx.add(workload, "qps", None, "q/s", error=str(exc))
                continue
        tool = "dnsperf" if have_dnsperf else "loadgen"
        ctx.add(workload, "qps", res["qps"], "q/s", tool=tool, lost=res["lost"])
        ctx.add(workload, "p50", res["p50_ms"], "ms", "lower")
        ctx.add(workload, "p99", res["p99_ms"], "ms", "lower")
        add_cpu_per(ctx, workload, "query", int(res.get("completed") or res.get("answered") or 0))


def read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no result line within {timeout:g}s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"client exited {proc.wait()} without a result")
            buf += chunk
    result: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return result


def settle_rss(roots: list[int], seconds: float = 1.0) -> int:
    """RSS (KiB, summed over the gateway's processes) once it had a moment to finish
    allocating for what was just opened."""
    time.sleep(seconds)
    return tree_rss_kib(roots)


@contextmanager
def holding(ns: Namespace, args: list[str], timeout: float) -> Iterator[dict[str, Any]]:
    """Run a loadgen ``hold-tcp``/``hold-udp`` client in ``ns`` and yield its result line while
    it holds its sockets; leaving the block makes it close them and waits for it to exit."""
    client = ns.popen(
        [sys.executable, LOADGEN, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        yield read_json_line(client, timeout)
    finally:
        assert client.stdin is not None
        try:
            client.stdin.write(b"done\n")
            client.stdin.close()
        except OSError:
            pass
        try:
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()


def phase_memory(ctx: Ctx, kind: str) -> None:
    """Idle RSS of a fresh gateway, then RSS with ``tcp_hold`` idle TCP connections (or
    ``udp_hold`` UDP sessions) held open; the per-connection cost is the growth / count."""
    roots = ctx.middle.roots
    if not roots:
        return  # the kernel has no process to measure
    idle = settle_rss(roots, 1.0)
    idle_pss = tree_pss_kib(roots)
    count = ctx.opts.tcp_hold if kind == "tcp" else ctx.opts.udp_hold
    if kind == "tcp":
        ctx.add("rss-idle", "rss", idle / 1024, "MiB", "lower")
        if idle_pss is not None:
            ctx.add("rss-idle", "pss", idle_pss / 1024, "MiB", "lower")
        args = ["hold-tcp", SRV_ADDR4, str(HOLD_PORT), "--count", str(count)]
        workload = f"rss-{count}-tcp"
    else:
        args = ["hold-udp", SRV_ADDR4, str(UDP_ECHO_PORT), "--count", str(count)]
        workload = f"rss-{count}-udp"
    limit = ctx.opts.step_timeout
    args += ["--max-time", str(limit), "--max-hold", str(limit + 60)]
    try:
        with ExitStack() as hold:
            with cpu_meter(ctx, workload):  # opening them, not closing them
                res = hold.enter_context(holding(ctx.split.cli, args, limit + 30))
            held = int(res["held"])
            rss = settle_rss(roots, 1.0)
            pss = tree_pss_kib(roots)
            split_pss = pss_by_root(roots) if len(roots) > 1 else None
    except (RuntimeError, TimeoutError) as exc:
        ctx.add(workload, "rss", None, "MiB", "lower", error=str(exc))
        return
    unit = "conn" if kind == "tcp" else "session"
    err = "" if held else f"none held: {res}"
    ctx.add(
        workload,
        "rss",
        rss / 1024,
        "MiB",
        "lower",
        error=err,
        held=held,
        failed=res.get("failed"),
        unfinished=res.get("unfinished"),
        errors=res.get("errors"),
        pss_kib_by_process=split_pss,
    )
    ctx.add(workload, f"held ({kind})", held, f"{unit}s")
    per = (rss - idle) / held if held else None
    ctx.add(workload, f"KiB per {unit}", per, "KiB", "lower")
    # A gateway of several processes (danted's children, tunlwip's workers) counts shared
    # pages once per process in RSS; PSS shares them out, so the two agree for one process.
    if pss is not None and idle_pss is not None and held:
        ctx.add(workload, f"KiB per {unit} (PSS)", (pss - idle_pss) / held, "KiB", "lower")


PHASE_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "iperf3-download": lambda c: phase_iperf3(c, "down"),
    "iperf3-upload": lambda c: phase_iperf3(c, "up"),
    "udp": lambda c: phase_udp(c, c.opts.udp_rate),
    "udp-bulk": lambda c: phase_udp(c, c.opts.udp_bulk_rate),
    "connrate": phase_connrate,
    "rr": phase_rr,
    "rr-plain": phase_rr_plain,
    "connrate-plain": phase_connrate_plain,
    "dns": phase_dns,
    "memory-tcp": lambda c: phase_memory(c, "tcp"),
    "memory-udp": lambda c: phase_memory(c, "udp"),
}

#: Phases that make no sense for a method, with the reason printed in their place.
NOT_APPLICABLE = {
    ("dns", "slirp4netns"): "no DNS proxy to measure (DNS is measured for tunlwip and kernel)",
    ("dns", "pasta"): "no DNS proxy to measure (DNS is measured for tunlwip and kernel)",
    ("dns", "hev"): "no DNS proxy to measure (DNS is measured for tunlwip and kernel)",
    ("memory-tcp", "kernel"): "no gateway process (memory is in the kernel's socket buffers)",
    ("memory-udp", "kernel"): "no gateway process (memory is in the kernel's socket buffers)",
}
