"""Smoke runs of the benchmark harness (bench/run.py): short phases through tunlwip, and the
methods that may be absent (hev-socks5-tunnel, tunlwip --workers 2) measured or skipped.

Why: `make bench` is too long for `make test`, and timing does not belong in tests, but the
harness must not rot: this runs its whole machinery (namespaces, ``tunlwip up``, a real iperf3,
the JSON lines and the markdown report) once, in a few seconds, and checks only that a positive
figure came out. No timing assertion.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"


def run_quick(
    workloads: str, out: Path, methods: str = "tunlwip", extra: Sequence[str] = ()
) -> str:
    """``bench/run.py --quick`` of ``workloads`` through ``methods``, results in ``out``;
    returns the tail of its output for assertion messages (it must have exited 0)."""
    cmd = [sys.executable, str(RUN), "--quick", "--methods", methods, "--workloads",
           workloads, "--results-dir", str(out), "--max-time", "60", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    log = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    return log


def load_records(out: Path) -> list[dict[str, Any]]:
    [jsonl] = out.glob("*.jsonl")
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def figure(records: list[dict[str, Any]], method: str, workload: str, metric: str) -> Any:
    """The one value ``method`` recorded for (workload, metric)."""
    key = (method, workload, metric)
    found = [r for r in records if (r["method"], r["workload"], r.get("metric")) == key]
    assert len(found) == 1, f"{method} {workload} {metric}: {found}\nrecords: {records}"
    return found[0]["value"]


def hev_binary() -> str | None:
    """hev-socks5-tunnel where the bench looks for it (not packaged: built by hand)."""
    return os.environ.get("HEV_SOCKS5_TUNNEL") or shutil.which("hev-socks5-tunnel")


def tunlwip_has_workers() -> bool:
    r = subprocess.run([sys.executable, "-m", "tunlwip", "up", "--help"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return "--workers" in r.stdout


def test_bench_quick_tunlwip_download(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """`bench/run.py --quick --methods tunlwip --workloads iperf3-download` exits 0 and
    records a positive TCP download throughput for tunlwip, in JSON lines and markdown."""
    require_tool("iperf3")
    out = tmp_path / "results"
    log = run_quick("iperf3-download", out)
    [jsonl] = out.glob("*.jsonl")
    [md] = out.glob("*.md")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    figures = [
        r
        for r in records
        if r["method"] == "tunlwip"
        and r["workload"] == "tcp-down-1-v4"
        and r.get("metric") == "throughput"
    ]
    assert len(figures) == 1, log + f"\nrecords: {records}"
    value = figures[0]["value"]
    assert isinstance(value, (int, float)) and value > 0, figures[0]
    assert figures[0]["unit"] == "Mbit/s" and figures[0]["mtu"] == 1500
    assert "TCP download, 1 stream, IPv4" in md.read_text(), md.read_text()


def test_bench_quick_tunlwip_plain(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """`--workloads plain` (the plain blocking client of issue 17) runs end to end through
    tunlwip: a positive request/response rate and connection rate, every connection
    answered. No timing assertion."""
    out = tmp_path / "results"
    log = run_quick("plain", out)
    [jsonl] = out.glob("*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rates = {
        r["workload"]: r for r in records if r["method"] == "tunlwip" and r.get("metric") == "rate"
    }
    assert set(rates) == {"rr-plain", "conn-plain"}, log + f"\nrecords: {records}"
    for r in rates.values():
        assert isinstance(r["value"], (int, float)) and r["value"] > 0, r
        assert not r["error"], r
    assert rates["conn-plain"]["extra"]["ok"] == 200, rates["conn-plain"]


def test_bench_quick_udp_bulk_cpu_per_gb(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """`--workloads udp-bulk` offers 3 Gbit/s of 1,400-byte datagrams each way through
    tunlwip: something arrives both ways, and the gateway's CPU per GB is recorded."""
    require_tool("iperf3")
    out = tmp_path / "results"
    run_quick("udp-bulk", out)
    records = load_records(out)
    for d in ("up", "down"):
        workload = f"udp-{d}-3G-v4"
        assert figure(records, "tunlwip", workload, "received") > 0
        assert figure(records, "tunlwip", workload, "CPU per GB") >= 0
    assert "UDP upload, 3Gbit/s offered" in next(out.glob("*.md")).read_text()


def test_bench_quick_connrate_cpu_per_conn(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """`--workloads connrate` records the gateway's CPU per connection for the serial and
    the 8-parallel runs, each connection answered."""
    out = tmp_path / "results"
    run_quick("connrate", out)
    records = load_records(out)
    for workload in ("conn-serial", "conn-par8"):
        assert figure(records, "tunlwip", workload, "rate") > 0
        assert figure(records, "tunlwip", workload, "failed") == 0
        assert figure(records, "tunlwip", workload, "CPU per conn") >= 0


def test_bench_hev_measured_or_skipped(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """The hev method: given a missing binary (--hev-bin) it is skipped with a note and the
    run goes on; with hev-socks5-tunnel and danted present (HEV_SOCKS5_TUNNEL or PATH) it
    carries a TCP download, with danted's CPU counted, and tunlwip gets a ratio to it."""
    out = tmp_path / "missing"
    log = run_quick("rr-plain", out, "hev,tunlwip", ["--hev-bin", str(tmp_path / "no-hev")])
    assert "SKIP hev" in log and "is not an executable file" in log, log
    records = load_records(out)
    assert [r["skipped"] for r in records if r["method"] == "hev"], records
    assert figure(records, "tunlwip", "rr-plain", "rate") > 0
    hev = hev_binary()
    if hev is None or shutil.which("danted") is None:
        return  # the skip path above is all there is to test here
    require_tool("iperf3")
    out = tmp_path / "present"
    run_quick("iperf3-download", out, "hev,tunlwip", ["--hev-bin", hev])
    records = load_records(out)
    assert figure(records, "hev", "tcp-down-1-v4", "throughput") > 0
    assert figure(records, "hev", "tcp-down-1-v4", "cpu") > 0
    ratio = [r["ratio_hev"] for r in records
             if r["method"] == "tunlwip" and r.get("metric") == "throughput"]  # fmt: skip
    assert ratio and ratio[0] > 0, records


def test_bench_tunlwip_w2_measured_or_skipped(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """tunlwip-w2 (`up --workers 2`) beside tunlwip: measured, with a workers 2 ÷ 1 ratio,
    when this tunlwip has --workers; otherwise skipped with a note while tunlwip runs."""
    out = tmp_path / "results"
    log = run_quick("rr-plain", out, "tunlwip,tunlwip-w2")
    records = load_records(out)
    assert figure(records, "tunlwip", "rr-plain", "rate") > 0
    if not tunlwip_has_workers():
        assert "SKIP tunlwip-w2" in log and "--workers" in log, log
        return
    assert figure(records, "tunlwip-w2", "rr-plain", "rate") > 0
    assert [r for r in records if r["method"] == "tunlwip-w2" and r.get("ratio_tunlwip")]


def test_bench_tunlwip_socks5_through_danted(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """tunlwip-socks5 (every flow through danted by --proxy) beside direct tunlwip: the
    download and the serial connections go through, with danted's CPU counted, a ratio to
    direct in each record, and the report's issue 16 table."""
    require_tool("danted")
    require_tool("iperf3")
    out = tmp_path / "results"
    run_quick("iperf3-download,connrate", out, "tunlwip,tunlwip-socks5")
    records = load_records(out)
    assert figure(records, "tunlwip-socks5", "tcp-down-1-v4", "throughput") > 0
    assert figure(records, "tunlwip-socks5", "tcp-down-1-v4", "cpu") > 0
    assert figure(records, "tunlwip-socks5", "conn-serial", "rate") > 0
    assert figure(records, "tunlwip-socks5", "conn-serial", "failed") == 0
    assert [r for r in records if r["method"] == "tunlwip-socks5" and r.get("ratio_tunlwip")]
    report = next(out.glob("*.md")).read_text()
    assert "Issue 16 target: through danted" in report, report
